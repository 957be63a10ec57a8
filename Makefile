# Two commands do everything on a fresh machine (see README):
#   make demo   set up, then run the main job on the embedded default
#   make test   set up, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ORCH := $(VENV)/bin/orch
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build (shared/ENVIRONMENT.md).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(ORCH) plan --model llama3.1-70b --cluster h100-8x8-ib

test: setup
	$(VENV)/bin/pytest tests

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info
