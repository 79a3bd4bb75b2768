# Two commands do all the set-up on a fresh Debian/Ubuntu machine:
#   make demo   - set up, then run the node with a synthetic study through it and show the result
#   make test   - set up, then run lint, type checks and the test suite
SHELL := /bin/bash
export PATH := $(PATH):/usr/sbin:/sbin
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := dcmtk dicom3tools orthanc redis-server
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest system-deps venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# DICOM and queue tools the tests talk to for real (needs root or sudo).
system-deps:
	@missing=""; \
	for t in storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc redis-server:redis-server; do \
	  command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: venv
	$(BIN)/opmri-node demo

lint: venv
	$(BIN)/ruff check opmri_node pipeline train tests bench
	$(BIN)/hadolint Dockerfile


typecheck: venv
	$(BIN)/mypy opmri_node pipeline train

pytest: venv system-deps
	TCP_NODELAY=1 $(BIN)/python -m pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) var build *.egg-info
