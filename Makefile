# sbg — Simple Border Gateway.  `make demo` and `make test` work on a fresh
# Debian 12 machine: they create .venv and install what they need.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYNAPSE_STAMP := .venv-synapse/.installed

.PHONY: all venv demo test unit e2e lint typecheck fuzz bench bench-forged deb clean

all: test

$(STAMP): setup.cfg setup.py requirements-dev.txt scripts/bootstrap
	./scripts/bootstrap "$(PYTHON)" "$(VENV)"
	touch $(STAMP)

venv: $(STAMP)

$(SYNAPSE_STAMP): scripts/install-synapse $(STAMP)
	./scripts/install-synapse
	touch $(SYNAPSE_STAMP)

demo: $(STAMP) $(SYNAPSE_STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m demo.federation

lint: $(STAMP)
	$(VENV)/bin/ruff check sbg tests testbed twisted demo bench
	$(VENV)/bin/ruff format --check sbg tests testbed twisted demo bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy sbg

unit: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m twisted.trial --reporter=text $$(PYTHONPATH=$(CURDIR) $(PY) -m tests.list_modules --unit)

e2e: $(STAMP) $(SYNAPSE_STAMP)
	SBG_E2E_REQUIRED=1 PYTHONPATH=$(CURDIR) $(PY) -m twisted.trial --reporter=text tests.e2e

test: lint typecheck unit e2e

fuzz: $(STAMP)
	PYTHONPATH=$(CURDIR) SBG_FUZZ_EXAMPLES=100000 SBG_FAULT_REQUESTS=10000 $(PY) -m twisted.trial tests.test_fuzz tests.test_upstream_faults

bench: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m bench.run

bench-forged: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m bench.forged

deb:
	./scripts/build-deb

clean:
	rm -rf $(VENV) .venv-synapse _trial_temp* .mypy_cache .ruff_cache build dist *.egg-info
