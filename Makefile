# make demo  -- create .venv if missing, then run the 2-process LoRA-MoE fine-tune demo
# make test  -- create .venv if missing, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moedist-installed

.PHONY: demo test test-slow venv clean

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

test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m "not slow" tests
	@if [ "$${MOEDIST_SLOW:-1}" = "1" ]; then \
	  PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m slow tests; rc=$$?; \
	  if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
