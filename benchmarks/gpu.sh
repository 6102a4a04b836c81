#!/usr/bin/env bash
# The GPU benchmark in one command, for a machine with one CUDA GPU (fits in 10 minutes):
# installs allmlp with its test extra (timm is the peer) into .venv if needed, then runs bench_gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -c "import allmlp, timm" 2>/dev/null || .venv/bin/pip install -q -e '.[test]'
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'"
exec .venv/bin/python benchmarks/bench_gpu.py --budget "${BUDGET:-480}" "$@"
