#!/usr/bin/env bash
# FlashAttention-4 in the engines (`--attention fa4`) and the smoothed FP8 attention's pending checks, as ONE
# detached job on the lent machine (lab/gpu_job.sh runs it):
#   1. GPU tests of the FP8 kernels (per-token and per-tile scales), before FA4's wheels are needed;
#   2. FA4's wheels installed once they have all arrived, then its op's GPU tests (vs fp32 and cuDNN, CUDA graphs)
#      and the shipped-kernel test (kernels exported, then loaded by a fresh process without compiling);
#   3. the full-size DiT engines (lab/gpu_build_engines.py): one dit_block engine per attention, cuDNN and FA4,
#      each DiT pass timed in the same run against the same eager model;
#   4. the eager full-size DiT per attention (lab/gpu_attention.py: kernel times, velocity cosine);
#   5. tiny FA4 and smoothed-FP8 engines through the pipeline against one shared tiny cuDNN build (last: two tiny
#      CUDA builds took over 430 s on 2026-12-06).
#
# Wheels: `bash lab/gpu_wheels_fa4.sh /tmp/carry` lays them out as one carry folder per call (call1: WH/av, PyAV,
# which every test module needs through the builder's imports, and WH/fa4/*.whl; call2 and call3: the 92 MB CuTe DSL
# library wheel in 40 MB pieces, WH/cu13.part-*); the call that brings the last piece touches WH/fa4.ready, which
# this job waits for (10 min at most). The tree: the device copies the working tree, uncommitted edits included, so
# carry `git archive --format=tar.gz -o .whl/tree.tgz HEAD` in the first call and run from that instead:
#
#   first call (carry .whl = call1 + tree.tgz):
#     mkdir -p /tmp/wh /tmp/tree && cp -r .whl/* /tmp/wh/ && tar -xzf .whl/tree.tgz -C /tmp/tree && cd /tmp/tree &&
#     python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . &&
#     PYTHONPATH=/tmp/site bash lab/gpu_job.sh start f -- bash lab/gpu_lease_fa4.sh /tmp/r /tmp/wh
#   second call (carry .whl = call2), at once:   cp .whl/* /tmp/wh/; bash lab/gpu_job.sh wait f 10 /tmp/r
#   third call (carry .whl = call3), at once:    cp .whl/* /tmp/wh/ && touch /tmp/wh/fa4.ready;
#                                                 bash lab/gpu_job.sh wait f 540 /tmp/r
#   then `bash lab/gpu_job.sh wait f 540 /tmp/r` back to back until it ends (results come back under $OUT/f/)
#
# $1: results folder; $2: the wheel folder; $3 "quick": after the op's tests only the attention kernels (step 4's
# `--steps attn`), for a lease with little device time left.
# fvrt must be importable (PYTHONPATH=/tmp/site after `pip install --target /tmp/site .`).
set -uo pipefail

R=${1:-/tmp/r}
W=${2:-/tmp/wh}
mkdir -p "$R"
step() { echo "=== [$SECONDS s] $*"; }
gpu_tests() {  # log name, pytest args...
  local name=$1
  shift
  python3 -m pytest -q -p no:cacheprovider -m gpu -rs "$@" 2>&1 | tee "$R/$name.log" | tail -n 25
}

# every test module imports the builder, which imports PyAV: it comes with the first call (WH/av)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4 "$W"/av/*.whl 2>&1 | tail -n 5
export PYTHONPATH="$PYTHONPATH:/tmp/fa4"

step "GPU tests: FP8 attention kernels"
gpu_tests fp8-kernel-tests tests/test_fp8_attention.py -k "not engines"

step "FlashAttention-4: waiting for its wheels"
for _ in $(seq 120); do
  [[ -f "$W/fa4.ready" ]] && break
  sleep 5
done
if [[ ! -f "$W/fa4.ready" ]]; then
  echo "the wheels did not arrive: stopping"
  exit 3
fi
lib="$W/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl"
cat "$W"/cu13.part-* >"$lib"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4 "$W"/fa4/*.whl "$lib" \
  2>&1 | tail -n 5
# nvidia-cutlass-dsl puts its `cutlass` package on sys.path with a .pth file, which a --target folder on PYTHONPATH
# does not run: name the folder itself
export PYTHONPATH="$PYTHONPATH:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages"
python3 -c "from fvrt.plugins import fa4_attention as f; import torch; print('fa4:', f.version(), f.supported(torch.device('cuda')))"

step "GPU tests: FlashAttention-4 op"
gpu_tests fa4-tests tests/test_fa4_attention.py -k "not engines and not kernels"

step "GPU tests: FA4's shipped kernels load in a fresh process without compiling"
gpu_tests kernel-tests tests/test_fa4_attention.py -k "kernels and not engines"

if [[ "${3:-}" == quick ]]; then  # little device time left: the attention kernels only, the op's included
  step "attention kernels at the DiT's shapes (FA4 through the engines' op)"
  PYTHONUNBUFFERED=1 python3 lab/gpu_attention.py --out "$R/attn" --steps attn 2>&1 | tee "$R/attn.log" | tail -n 30
  step "done (quick)"
  exit 0
fi

step "full-size DiT engines: cuDNN and FA4 blocks in one run"
PYTHONUNBUFFERED=1 FVRT_CXX=g++-12 python3 lab/gpu_build_engines.py --stages dit --attention cudnn,fa4 \
  --repeats 2 --out "$R/dit" 2>&1 | tee "$R/dit.log" | tail -n 40

step "eager full-size DiT per attention"
PYTHONUNBUFFERED=1 python3 lab/gpu_attention.py --out "$R/attn" --steps attn,dit --dit-attention fa4,fp8s,fp8s_tok \
  --dit-keep-ends "" --dit-fp8-linears "" --no-dit-flash --no-dit-fast-accum 2>&1 | tee "$R/attn.log" | tail -n 40

step "GPU tests: FA4 and smoothed FP8 engines through the pipeline (one shared cuDNN build)"
FVRT_CXX=g++-12 gpu_tests engine-tests tests/test_fa4_attention.py tests/test_fp8_attention.py -k engines

step "done"
