# The two commands (README, "The two commands"):
#   make train   set up .venv when needed, then train the main job (MNIST-5k)
#   make test    set up .venv when needed, run the test suite, then the support-window smoke run
# Set-up creates .venv with the tested torch and installs the package with every feature that runs
# on a CPU (extra `dev`). It runs again only when pyproject.toml or the torch pin changes.
#
# Variables: PYTHON (the interpreter that makes the venv), TORCH (the torch pin),
# ARGS (extra flags for train: make train ARGS="--epochs 3"), PYTEST_ARGS (make test PYTEST_ARGS="-x tests/test_config.py").

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
PYTEST_ARGS ?=

# The stamp's name holds a checksum of pyproject.toml and the torch pin: a change re-installs.
KEY := $(shell { cat pyproject.toml; echo '$(TORCH)'; } | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.lightrainer-setup-$(KEY)

.PHONY: train test setup support-window

train: $(STAMP)
	$(VENV)/bin/lightrainer fit --config configs/mnist.yaml $(ARGS)

# The support-window smoke run uses this interpreter (python3: the local torch 2.13 CPU wheel; the
# script alone defaults to python3.10, whose torch 2.13 is the 5 GB CUDA build from PyPI).
SUPPORT_PYTHON ?= python3

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
	PYTHON=$(SUPPORT_PYTHON) .ci/support-window

setup: $(STAMP)

support-window:
	.ci/support-window

$(STAMP):
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(TORCH)
	$(VENV)/bin/python -m pip install -e ".[dev]"
	rm -f $(VENV)/.lightrainer-setup-*
	touch $@
