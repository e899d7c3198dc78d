# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aclab-installed

.PHONY: setup demo test test-slow lint bench docs clean mutation mutation-generic

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

setup: $(STAMP)

## Train PPO on CartPole-v1 (embedded, no download), print a summary, write runs/demo/learning_curve.png
demo: $(STAMP)
	$(PY) -m aclab train ppo --env CartPole-v1 --run-dir runs/demo --overwrite

## The CI suite (slow learning tests excluded)
test: $(STAMP)
	$(PY) -m pytest -q

## Long learning tests (minutes)
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

## The semantic mutation suite (docs/testing.md): every hand-written mutant in mutation/mutants/*.toml
## must make its tests fail. Filters: ONLY=<id>[,<id>] FAMILY=<family>[,<family>]; JOBS=<workers>.
JOBS ?= 2
mutation: $(STAMP)
	$(PY) mutation/semantic.py --jobs $(JOBS) $(if $(ONLY),--only $(ONLY)) $(if $(FAMILY),--family $(FAMILY))

## The generic mutation tool (mutmut) over aclab/core and VecEnv.reset/step; equivalents in
## mutation/equivalent.toml; fails below a 90% score (docs/testing.md). JOBS: mutmut's --max-children.
mutation-generic: $(STAMP)
	$(PY) mutation/generic.py --max-children $(JOBS)

lint: $(STAMP)
	$(VENV)/bin/ruff check aclab tests benchmarks docs

## The documentation site (MkDocs Material, API pages from the docstrings) in site/; strict: any warning fails.
## The test suite builds it too (tests/test_docs.py), so CI checks it.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/ppo_speed.py

clean:
	rm -rf runs site .pytest_cache
