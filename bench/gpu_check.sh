#!/usr/bin/env bash
# The one-call device check (issue 8): on one GPU, within 8 minutes (about 6.5 at most: 150 s of
# tests, 230 s of benchmark, plus the wheel install),
#   (a) the GPU tests (pytest -m gpu): the mesh on CUDA vs transformers on CUDA, fp32 (1e-4) and bf16
#       (tests/test_gpu.py states the tolerance: 3e-2 of max|logit| at 90% of steps, none past 0.35);
#       mixed devices; the CUDA IPC data plane between two processes (tests/test_gpu_ipc.py); NCCL
#       with the ranks one GPU allows (tests/test_gpu_nccl.py: TP group of one, CuPy communicator,
#       the two-process handshake, whose outcome it prints);
#   (b) the decode throughput benchmark (bench/gpu_throughput.py) on a ~3.6 GB bf16 Mixtral-shaped
#       model: transformers and the mesh at batch 1 and 32, each against the copy-bandwidth floor.
# Writes gpu_tests.log, gpu_tests.xml (JUnit) and gpu_throughput.md to $OUT (else bench/results/).
# Exit status: non-zero if either part failed (both always run).
#
#   bash bench/gpu_check.sh                      # on the GPU machine (python3 there holds torch)
#   bash bench/gpu_check.sh --device cpu --tiny  # a smoke run here: GPU tests skip, tiny model
#
# Arguments are passed to gpu_throughput.py. Wheels in .whl/ (what the device image lacks: protobuf
# 7.36.2, grpcio 1.85.3, grpcio-health-checking and grpcio-reflection 1.85.1, and cryptography 50.0.2 +
# cffi 2.1.1 + pycparser 3.12 so that tests/test_tls.py imports) are installed to /tmp/site first.
# Fetch them here with `pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
# --platform manylinux2014_x86_64 -d .whl NAME==VERSION` (.whl/ is in .git/info/exclude).
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=${OUT:-$REPO/bench/results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ ! -x .venv/bin/python ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
start=$SECONDS
echo "== $(date -u +%FT%TZ) gpu_check on $(hostname); python: $PY"
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
"$PY" -c 'import torch, grpc, google.protobuf, transformers, safetensors as s
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "| grpcio", grpc.__version__, "| protobuf", google.protobuf.__version__,
      "| transformers", transformers.__version__, "| safetensors", s.__version__)
try:
    import cupy
    from cupy.cuda import nccl
    print("cupy", cupy.__version__, "nccl", nccl.get_version())
except Exception as error:
    print("no cupy/nccl:", error)'

echo "== (a) GPU tests"
# Only the modules that hold gpu tests are collected: the device image lacks some test-only packages.
timeout 150 "$PY" -m pytest -m gpu tests/test_gpu*.py -v -rs -s -p no:cacheprovider -o faulthandler_timeout=120 \
  --junitxml="$OUT_DIR/gpu_tests.xml" 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=$?
echo "== GPU tests exit $tests_rc after $((SECONDS - start)) s"

echo "== (b) decode throughput"
timeout 230 "$PY" bench/gpu_throughput.py "$@"
bench_rc=$?
echo "== benchmark exit $bench_rc; total $((SECONDS - start)) s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
