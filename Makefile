# make demo: the toy pipeline end to end on CPU.
# make test: the fast, offline tier (unit, parity and invariant tests, tiny end-to-end runs) before every commit;
# make test-all: everything, with the notebooks, the downloads and the CLI smoke runs (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-all mutants notebooks clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

demo: $(VENV)/.installed
	$(PY) -m minicwac demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.installed-test
	$(PY) -m pytest -q

# plant small bugs in the method's code one at a time and check that the fast tests catch each (docs/testing.md)
mutants: $(VENV)/.installed-test
	$(PY) tests/mutants.py

# re-run the notebooks in place: their outputs and a digest of each code cell (make test checks the digests,
# make test-all re-runs each notebook and compares its key figures)
notebooks: $(VENV)/.installed-test
	$(PY) tests/run_notebooks.py notebooks/*.ipynb

clean:
	rm -rf $(VENV) runs
