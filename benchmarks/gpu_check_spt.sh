#!/usr/bin/env bash
# SPT on a fresh CUDA machine (H100/H200): install what is missing, check the Triton kernels against the PyTorch
# reference on the GPU (float32/float16/bfloat16), then run the GPU benchmarks. Run from anywhere:
#
#     OUT=/some/dir bash benchmarks/gpu_check_spt.sh
#
# Results go to $OUT (default: ./gpu_check_spt_out): env.txt, tests.log, bench.log, bench_spt.json (ratios to the
# dense baselines), bench_gpu.json (pytest-benchmark's raw timings). Exit status: non-zero if the tests or the
# benchmarks failed; the benchmarks run even when a test fails, so one run gives every number.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_check_spt_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export OUT
cd "$REPO"

# Install only what is missing: an existing (CUDA) torch is never replaced.
need() { "$PY" -c "import $1" 2>/dev/null || "$PY" -m pip install --quiet "$2"; }
need torch torch
need triton triton
"$PY" -c "import transformers, sys; sys.exit(int(transformers.__version__.split('.')[0]) < 5)" 2>/dev/null \
    || "$PY" -m pip install --quiet "transformers>=5"
need peft "peft>=0.13"
need pytest "pytest>=8"
need pytest_benchmark "pytest-benchmark>=4"

{
    nvidia-smi || true
    "$PY" -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| triton', triton.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: nothing to check here" | tee -a "$OUT/env.txt"
    exit 1
fi

# Correctness. With CUDA, tests/spt/triton runs on the GPU directly (its CPU-interpreter wrapper skips itself);
# -o addopts= drops the repo's default options so this log is the same wherever it runs.
"$PY" -m pytest -q -ra -p no:cacheprovider -o addopts= tests/spt 2>&1 | tee "$OUT/tests.log"
tests_status=${PIPESTATUS[0]}

# GPU benchmarks: sparse attention vs eager vs SDPA at L = 1k..8k, head dim 64/128; routed FFN vs dense.
"$PY" -m pytest -q -s -p no:cacheprovider -o addopts= benchmarks/bench_spt.py -k gpu \
    --benchmark-enable --benchmark-columns=mean,stddev,rounds --benchmark-json="$OUT/bench_gpu.json" \
    2>&1 | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}

echo "tests exit status: $tests_status, benchmarks exit status: $bench_status" | tee -a "$OUT/env.txt"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
