#!/usr/bin/env bash
# FlashAttention-3 in the engines, the shortest lease that answers it (about 9 min of device time, the machine's
# start not included), as ONE detached job (lab/gpu_job.sh runs it):
#   1. FlashAttention-3's head-dim-128 SM90 forward built from source (lab/fa3_build.py, ~104 s on 16 CPUs);
#   2. the fa3fp8 and fa3 ops' GPU tests (error against fp32 on random and trained-like inputs, CUDA-graph capture);
#   3. the full-size DiT engines with cuDNN, FA3 bf16 (`--attention fa3`, exact) and FA3 FP8 (`--attention fa3fp8`,
#      exact FA3 below 16,384 tokens) blocks, each built, checked against eager and its DiT pass timed at both
#      token counts in one run (lab/gpu_build_engines.py; bf16 linears).
# lab/gpu_lease_sage.sh's `fa3` mode does this with SageAttention 2 beside it (about 12 min).
#
# Carry .whl with av (every test module imports the builder, which imports PyAV), tree.tgz (`git archive
# --format=tar.gz -o .whl/tree.tgz HEAD`), fa-hopper.tgz and cutlass-include.tgz (recipes in lab/gpu_lease_sage.sh):
#     mkdir -p /tmp/wh /tmp/tree /tmp/fa3-src /tmp/cutlass && cp .whl/*.whl /tmp/wh/ &&
#     tar -xzf .whl/tree.tgz -C /tmp/tree && tar -xzf .whl/fa-hopper.tgz -C /tmp/fa3-src &&
#     tar -xzf .whl/cutlass-include.tgz -C /tmp/cutlass && cd /tmp/tree &&
#     python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . /tmp/wh/*.whl &&
#     PYTHONPATH=/tmp/site FA3_SRC=/tmp/fa3-src CUTLASS_SRC=/tmp/cutlass bash lab/gpu_job.sh start f -- \
#       bash lab/gpu_lease_fa3.sh /tmp/r; bash lab/gpu_job.sh wait f 540 /tmp/r
# then `bash lab/gpu_job.sh wait f 540 /tmp/r` until it ends (results under $OUT/f/).
# $1: results folder (default /tmp/r); $2: the attentions of step 3 (default cudnn,fa3,fa3fp8).
set -uo pipefail

R=${1:-/tmp/r}
ATTN=${2:-cudnn,fa3,fa3fp8}
mkdir -p "$R"
export FVRT_CXX=${FVRT_CXX:-g++-12}
step() { echo "=== [$SECONDS s] $*"; }

step "FlashAttention-3: building its head-dim-128 forward ($R/fa3-build.log)"
python3 lab/fa3_build.py --src "${FA3_SRC:?}" --cutlass "${CUTLASS_SRC:?}" --target /tmp/fa3 --jobs "$(nproc)" \
  >"$R/fa3-build.log" 2>&1
echo "rc=$?" >>"$R/fa3-build.log"
tail -n 3 "$R/fa3-build.log"
export PYTHONPATH="${PYTHONPATH:-}:/tmp/fa3"
python3 -c "from fvrt.plugins import fa3_attention as f; import torch; print('fa3:', f.supported(torch.device('cuda')))"

step "GPU tests: the fa3fp8 and fa3 ops (error, CUDA-graph capture)"
python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_fa3_attention.py 2>&1 | tee "$R/fa3-tests.log" |
  tail -n 15

step "full-size DiT engines, one run: $ATTN"
PYTHONUNBUFFERED=1 python3 lab/gpu_build_engines.py --stages dit --attention "$ATTN" --repeats 2 --out "$R/engines" \
  2>&1 | tee "$R/engines.log" | tail -n 16
step "done"
