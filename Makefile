# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench aot clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medplib demo --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile tests

bench: $(STAMP)
	$(PY) -m bench.run_all

aot: $(STAMP)
	$(PY) -m bench.aot_7b

clean:
	rm -rf $(VENV) runs
