#!/usr/bin/env bash
# One-command GPU check of the Triton route: the CUDA tests (the threshold kernels under
# torch.cuda.set_sync_debug_mode("error"), where any host synchronisation fails a test,
# and every registered operator on CUDA against the CPU), then the benchmark suite on the
# GPU. Run from anywhere, on a machine with a CUDA device:
#
#     bash benchmarks/gpu_check.sh [extra arguments for softtopk bench]
#
# PYTHON picks the interpreter (default: python). Results of the benchmark go to
# results/gpu_check/ (CSV, JSON, plots). Exits non-zero when a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# The compiled kernels, not the interpreter; the Triton route forced (auto keeps CUDA tensors
# on the tensor-op reference until the kernels are checked on a GPU).
unset TRITON_INTERPRET
export SOFTTOPK_BACKEND=triton

"$PY" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
import triton

print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
EOF

echo "== CUDA tests (sync debug mode: error) =="
"$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/threshold/test_triton.py tests/test_cuda.py

echo "== the same kernels under the interpreter (CPU tensors) =="
TRITON_INTERPRET=1 SOFTTOPK_BACKEND=triton CUDA_VISIBLE_DEVICES="" \
    "$PY" -m pytest -q -p no:cacheprovider -rs tests/threshold/test_triton.py

echo "== softtopk bench --device cuda =="
# --suite shapes (the issue's shapes: MoE, vocabulary, indexer, SAE) comes with the
# benchmark's shapes suite; older versions of the command run their default suite.
if "$PY" -m softtopk bench --help | grep -q shapes; then
    suite=(--suite shapes)
else
    echo "gpu_check: this softtopk bench has no --suite shapes; running its default suite"
    suite=()
fi
"$PY" -m softtopk bench --device cuda "${suite[@]}" --out results/gpu_check "$@"
