# Two commands do all the set-up on a fresh machine:
#   make run    create .venv if absent, install lipexp into it, train the default run
#   make test   the same set-up, then the test suite
# Extra arguments for run.py: make run ARGS="adv=j1 lip=lip1 recipe.epochs=5"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lipexp-installed

.PHONY: install run test test-slow lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) run.py $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(ARGS)

# ruff check only: the code keeps hand-aligned continuation lines, which `ruff format`
# would rewrite, so formatting is not enforced.
lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs multirun .pytest_cache
