# The two commands of the README's Quick start: `make demo` and `make test`.
# Both create the virtual environment on first use and reinstall when the requirements change.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

demo: install
	$(PY) demo.py

test: install
	$(PY) -m pytest
