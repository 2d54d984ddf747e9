#!/usr/bin/env bash
# Issue 18's kernel measurements as ONE detached job on the lent machine (lab/gpu_job.sh runs it): the GPU tests
# of the FP8 attention kernels, then lab/gpu_attention.py (ceilings, attention variants, the full-size DiT's
# velocity cosine per variant, the DiT's GEMMs), then FlashAttention-4 once its wheels are in place.
#
#   cp -r . /tmp/tree && cd /tmp/tree && bash lab/gpu_job.sh start a -- bash lab/gpu_lease_attention.sh /tmp/r /tmp/wh
#   bash lab/gpu_job.sh wait a 540 /tmp/r
#
# $1: results folder; $2: the wheel folder. FlashAttention-4's CuTe DSL library wheel (92 MB) is over one call's
# 64 MiB, so it arrives in pieces over two calls (`split -b 40M`: WH/cu13.part-*) beside its small wheels
# (WH/fa4/*.whl); the call that brings the last piece touches WH/fa4.ready, which this job waits for (10 min at
# most). fvrt itself must be importable (PYTHONPATH=/tmp/site after `pip install --target /tmp/site .`).
set -uo pipefail

R=${1:-/tmp/r}
W=${2:-/tmp/wh}
mkdir -p "$R"
step() { echo "=== [$SECONDS s] $*"; }

step "GPU tests: FP8 attention kernels"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fp8_attention.py 2>&1 | tail -n 20 | tee "$R/gpu-tests.log"

step "lab/gpu_attention.py: ceilings, attention, DiT, GEMMs"
PYTHONUNBUFFERED=1 python3 lab/gpu_attention.py --out "$R/attn" --steps ceil,attn,dit,gemm 2>&1 | tee "$R/attn.log"

step "FlashAttention-4: waiting for its wheels"
for _ in $(seq 120); do
  [[ -f "$W/fa4.ready" ]] && break
  sleep 5
done
if [[ -f "$W/fa4.ready" ]]; then
  lib="$W/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl"
  cat "$W"/cu13.part-* >"$lib"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4 "$W"/fa4/*.whl "$lib" 2>&1 |
    tail -n 5
  PYTHONUNBUFFERED=1 python3 lab/gpu_attention.py --out "$R/fa4" --steps fa4 --fa4-site /tmp/fa4 2>&1 | tee "$R/fa4.log"
else
  echo "FlashAttention-4's wheels did not arrive: skipped"
fi
step "done"
