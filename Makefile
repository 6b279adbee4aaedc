# Quick start: `make demo` and `make test`. Both create .venv with the pinned, tested stack and install the data they use.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv data demo test check-wheel clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt requirements/data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/lock.txt -e ".[all,test,fasterai]"
	$(PY) -m pip install -q --no-deps -r requirements/data.txt
	touch $(STAMP)

# Fashion-MNIST (Debian's dataset-fashion-mnist): system-wide as root, else unpacked into .venv (see the script).
data: $(STAMP)
	@sh requirements/fashion-mnist.sh $(VENV)

# --resume: a demo stopped part-way (Ctrl-C, an error) continues from its completed stages when run again.
demo: data
	COMPRESS_RERUN="make demo" $(VENV)/bin/compress run configs/demo.yaml -o runs/demo --resume

test: data
	$(PY) -m pytest $(PYTEST_ARGS)

# Build the wheel, install it into a throw-away venv and run it outside the checkout (also part of `make test`).
check-wheel: $(STAMP)
	$(PY) -m pytest tests/test_packaging.py

clean:
	rm -rf $(VENV) runs build dist *.egg-info
