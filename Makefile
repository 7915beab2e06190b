# `make test` and `make demo` each set up .venv from nothing on a fresh machine.
# torch 2.13.0 is installed first: a bare `torch` requirement could pull a multi-GB CUDA build; the
# second install names it again so that no dependency (trl, accelerate, ...) can upgrade it.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test demo clean fixtures

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,plot,trl]' torch==2.13.0  # torch named again: no extra may replace it
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks fixtures examples
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

demo: $(STAMP)
	bash scripts/demo.sh

fixtures: $(STAMP)
	$(PY) fixtures/make_fixtures.py
	$(PY) fixtures/make_layout_fixtures.py

clean:
	rm -rf .demo nextrap-fit
