# make demo  -- create .venv if missing, then run the 2-process LoRA-MoE fine-tune demos (byte-level, then HF)
# make test  -- create .venv if missing, install missing system packages (.ci/system-deps:
#               slurm-wlm, munge, iproute2, docker.io, debootstrap, iptables, man-db, groff-base;
#               as root with apt-get,
#               else one line says what to install),
#               then run the default suite and the slow suite (MOEDIST_SLOW=0 skips the latter)
# make study TABLE=a  -- one table (a|b|c|d) of the lifelong-learning study (configs/study/TABLE.yaml;
#               resumable: finished runs are skipped; report in runs/study/TABLE/report.md)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moedist-installed

.PHONY: demo test test-slow venv system-deps study clean

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

# The study of docs/RESULTS.md "Study (in progress)", one table per call, one core per job.
study: $(STAMP)
	@test -n "$(TABLE)" || { echo "make study: give TABLE=a|b|c|d"; exit 2; }
	$(PY) -m moedist.study run $(TABLE)

clean:
	rm -rf $(VENV) build *.egg-info
