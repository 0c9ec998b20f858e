# One-command set-up: `make demo` (train + evaluate + export the offline digits demo), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) recipes/train.py

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache
