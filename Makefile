# make demo  -- create .venv if missing, then run the 2-process LoRA-MoE fine-tune demos (byte-level, then HF)
# make test  -- create .venv if missing, install missing system packages (.ci/system-deps:
#               slurm-wlm, munge, iproute2, docker.io, debootstrap, iptables; as root with apt-get,
#               else one line says what to install),
#               then run the default suite and the slow suite (MOEDIST_SLOW=0 skips the latter)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moedist-installed

.PHONY: demo test test-slow venv system-deps clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: deepspeed would otherwise pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,mpi]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moedist demo
	$(VENV)/bin/moedist demo --hf

# System packages some tests start for real (a local SLURM cluster, network namespaces, dockerd).
system-deps:
	@bash .ci/system-deps

# pytest exit 5 (no tests collected) fails either suite like any other non-zero exit.
test: $(STAMP) system-deps
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m "not slow" tests
	@if [ "$${MOEDIST_SLOW:-1}" = "1" ]; then \
	  echo 'PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m slow tests'; \
	  PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m slow tests; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
