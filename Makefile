# Two commands do all the set-up on a fresh machine:
#   make run    create .venv if absent, install lipexp into it, train the default run
#   make test   the same set-up, then the test suite
# Extra arguments for run.py: make run ARGS="adv=j1 lip=lip1 recipe.epochs=5"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lipexp-installed

.PHONY: install run test test-slow test-numerics lint clean wheelhouse gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) run.py $(ARGS)

# Two pytest-xdist workers, one test file each at a time (module fixtures computed once); each
# test process and every run.py it starts uses one torch thread (tests/conftest.py sets
# OMP_NUM_THREADS=1 unless given): 7.5 min on a 2-core Xeon. Plain `pytest` runs serially.
test: install
	$(PY) -m pytest -n 2 --dist loadfile $(ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(ARGS)

# The numerics-marked tests once under each CPU kernel set this machine offers
# (ATEN_CPU_CAPABILITY, MKL/oneDNN capped at AVX2) with 1 and 2 threads; ARGS=--all for the
# whole default suite instead of the marked tests.
test-numerics: install
	$(PY) tests/numerics_matrix.py $(ARGS)

# ruff check only: the code keeps hand-aligned continuation lines, which `ruff format`
# would rewrite, so formatting is not enforced.
lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs multirun .pytest_cache

# The GPU check (benchmarks/README.md). `make wheelhouse`, where a package registry is
# reachable: ./wheelhouse gets the pure-Python (py3-none-any) wheels of the runtime
# dependencies that the GPU image (python 3.12 with torch, torchvision, Lightning,
# torchmetrics, numpy, matplotlib, scikit-learn, tensorboard, pytest) lacks, at .venv's
# versions, and lipexp's own wheel (its metadata: the version; the code runs from the tree).
# Carried too: cloudpickle (submitit's dependency, pure Python), and pytest-xdist with execnet
# (pure Python) so that the check's CUDA tests run in 8 processes (serially without them).
# Never committed (.gitignore); at most 60 MiB. wandb is binary and big: not carried (lipexp
# imports it for logger=wandb only; the check runs without it). lipexp is built from a copy:
# setuptools would leave build/ in the tree.
WHEELHOUSE := wheelhouse
WHEELHOUSE_WHEELS := hydra-core omegaconf torchattacks submitit cloudpickle \
	hydra-submitit-launcher hydra-joblib-launcher pytest-xdist execnet
WHEELHOUSE_SDISTS := antlr4-python3-runtime  # OmegaConf's parser: an sdist only, built here
pins = $(shell $(PY) -c 'import sys; from importlib.metadata import version as v; \
	print(" ".join(f"{n}=={v(n)}" for n in sys.argv[1:]))' $(1))

wheelhouse: install
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation py --abi none --platform any -d $(WHEELHOUSE) \
		$(call pins,$(WHEELHOUSE_WHEELS))
	$(PY) -m pip wheel -q --no-deps -w $(WHEELHOUSE) $(call pins,$(WHEELHOUSE_SDISTS))
	tmp=$$(mktemp -d) && cp -r pyproject.toml README.md lipexp $$tmp && \
		$(PY) -m pip wheel -q --no-deps -w $(WHEELHOUSE) $$tmp; status=$$?; rm -rf $$tmp; \
		exit $$status
	@! ls $(WHEELHOUSE) | grep -v -- '-none-any\.whl$$' || \
		{ echo "wheelhouse: not pure-Python wheels (above)"; exit 1; }
	@ls -1 $(WHEELHOUSE)
	@bytes=$$(du -sb $(WHEELHOUSE) | cut -f1); echo "wheelhouse: $$((bytes / 1024)) KiB"; \
		test $$bytes -le $$((60 * 1024 * 1024)) || { echo "wheelhouse: over 60 MiB"; exit 1; }

# On the GPU machine (no network; wheelhouse/ carried there): installs the wheelhouse where
# lipexp's dependencies are missing, then runs every part (budgeted at 6 min on one H100:
# estimates, not yet measured);
# ARGS="--only step,eval" reruns parts, ARGS="--device cpu --quick" is the dry run.
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash benchmarks/gpu_check.sh $(ARGS)
