#!/usr/bin/env bash
# SageAttention 2 (`--attention sage`: INT8 Q K^T, FP8 P V) and FlashAttention-4 (`--attention fa4`) in the engines,
# as ONE detached job on the lent machine (lab/gpu_job.sh runs it), most informative first, so that a machine taken
# back early still leaves the SageAttention figures:
#   0. SageAttention 2's Hopper kernels built from the carried source (lab/sage_build.py, in the background on the
#      machine's CPUs) while
#   1. the FP8 kernels' GPU tests run;
#   2. SageAttention's GPU tests (error against fp32 on random and offset keys, CUDA-graph capture);
#   3. the attention kernels at the DiT's shapes (lab/gpu_attention.py --steps attn: cuDNN, FlashAttention-2,
#      SageAttention, the Triton FP8 variants, FA4 if installed by then; time and error against fp32);
#   4. the eager full-size DiT's velocity per attention (sage as the engines route it, sage_all in every attention,
#      sage with blocks 0 and 43-47 exact, fp8s; then with the FP8 linears: cuDNN and sage): the 8-bit gate
#      (cosine >= 0.99);
#   5. FA4's wheels installed if they have all arrived (at most FA4_WAIT_S more seconds), its op's GPU tests and the
#      shipped-kernel test;
#   6. the full-size DiT engines with cuDNN, SageAttention (and FA4) blocks, each DiT pass timed in one run;
#   7. tiny sage, FA4 and smoothed-FP8 engines through the pipeline against one shared tiny cuDNN build.
#
# Carry (one folder per call, `bash lab/gpu_wheels_fa4.sh /tmp/carry` lays out the wheels): the first call brings
# .whl = call1 (WH/av, WH/fa4) + tree.tgz (`git archive --format=tar.gz -o .whl/tree.tgz HEAD`: the device copies
# uncommitted edits too) + sage-src.tgz (SageAttention's source: `git archive HEAD csrc sageattention LICENSE` of
# thu-ml/SageAttention, tested at d1a57a5, gzipped):
#
#   first call (carry .whl = call1 + tree.tgz + sage-src.tgz):
#     mkdir -p /tmp/wh /tmp/tree /tmp/sage-src && cp -r .whl/* /tmp/wh/ && tar -xzf .whl/tree.tgz -C /tmp/tree &&
#     tar -xzf .whl/sage-src.tgz -C /tmp/sage-src && cd /tmp/tree &&
#     python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . &&
#     PYTHONPATH=/tmp/site bash lab/gpu_job.sh start s -- bash lab/gpu_lease_sage.sh /tmp/r /tmp/wh /tmp/sage-src
#   second call (carry .whl = call2), at once:   cp .whl/* /tmp/wh/; bash lab/gpu_job.sh wait s 10 /tmp/r
#   third call (carry .whl = call3), at once:    cp .whl/* /tmp/wh/ && touch /tmp/wh/fa4.ready;
#                                                 bash lab/gpu_job.sh wait s 540 /tmp/r
#   then `bash lab/gpu_job.sh wait s 540 /tmp/r` back to back until it ends (results come back under $OUT/s/)
# When machines are scarce (starts failing, machines taken back between calls), let the first call also wait:
# `...start s -- bash lab/gpu_lease_sage.sh /tmp/r /tmp/wh /tmp/sage-src minimal; bash lab/gpu_job.sh wait s 170
# /tmp/r` returned the whole `minimal` table in one call on 2026-12-07 (132 s build, 164 s in all).
#
# The `fa3` mode also needs FlashAttention-3's and CUTLASS's sources in the carry (2.5 MB): in Dao-AILab/flash-attention
# (tested at 0251105a) `git archive --format=tar.gz -o .whl/fa-hopper.tgz HEAD hopper LICENSE`, in NVIDIA/cutlass
# `git archive --format=tar.gz -o .whl/cutlass-include.tgz 7127592 include LICENSE.txt` (the commit flash-attention's
# csrc/cutlass submodule names); unpack them on the machine and name them in FA3_SRC and CUTLASS_SRC. cuDNN's FP8
# attention is timed too when .whl/cfe/ holds the nvidia-cudnn-frontend wheel (cp312, 12 MB; `pip download
# --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 nvidia-cudnn-frontend`):
#     ... && tar -xzf .whl/fa-hopper.tgz -C /tmp/fa3-src && tar -xzf .whl/cutlass-include.tgz -C /tmp/cutlass && ...
#     FA3_SRC=/tmp/fa3-src CUTLASS_SRC=/tmp/cutlass PYTHONPATH=/tmp/site bash lab/gpu_job.sh start s -- \
#       bash lab/gpu_lease_sage.sh /tmp/r /tmp/wh /tmp/sage-src fa3; PYTHONPATH=/tmp/site bash lab/gpu_job.sh wait s 540 /tmp/r
#
# $1: results folder; $2: the wheel folder; $3: SageAttention's source; $4 "quick": stop after step 5 (and time
# only the kernels that decide in step 3); "minimal": the build, then steps 3 (cuDNN, sage, fp8s) and 2 only;
# "engines": the build, the test that kernel modes lower their SDPA fallbacks to cuDNN, then step 6 (cudnn, sage);
# "fa3": FlashAttention-3's Hopper forward built too (lab/fa3_build.py from $FA3_SRC and $CUTLASS_SRC, beside the
# SageAttention build; while they compile, cuDNN's FP8 kernel rows with CUDNN_FP8=1: Hopper declines it); then the
# fa3fp8 and fa3 ops' GPU tests, the kernel table (cuDNN, FA3 bf16 = `--attention fa3`, FA3 smoothed FP8 =
# `--attention fa3fp8`, sage), step 6 (cudnn, fa3, fa3fp8, sage) and the eager DiT's velocity with fa3fp8 as the
# engines route it: about 12 min (2026-12-07: FA3's build 104 s, SageAttention's 182 s).
# FA4_WAIT_S: how long step 5 waits for the last FA4 wheel (default 60).
# fvrt must be importable (PYTHONPATH=/tmp/site after `pip install --target /tmp/site .`).
set -uo pipefail

R=${1:-/tmp/r}
W=${2:-/tmp/wh}
S=${3:-/tmp/sage-src}
mkdir -p "$R"
step() { echo "=== [$SECONDS s] $*"; }
gpu_tests() {  # log name, pytest args...
  local name=$1
  shift
  python3 -m pytest -q -p no:cacheprovider -m gpu -rs "$@" 2>&1 | tee "$R/$name.log" | tail -n 25
}

lowering_test_then_sage() {  # the cuDNN-lowering GPU test while SageAttention builds, then SageAttention importable
  step "GPU test: a kernel mode's small attentions lower to cuDNN"
  gpu_tests lowering-test tests/test_sage_attention.py -k lower_their_small
  wait "$sage_pid"
  tail -n 2 "$R/sage-build.log"
  export PYTHONPATH="$PYTHONPATH:/tmp/sage"
}

step "SageAttention 2: building its Hopper kernels in the background ($R/sage-build.log)"
(python3 lab/sage_build.py --src "$S" --target /tmp/sage --jobs "$(nproc)" >"$R/sage-build.log" 2>&1
  echo "rc=$?" >>"$R/sage-build.log") &
sage_pid=$!

# every test module imports the builder, which imports PyAV: it comes with the first call (WH/av)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4 "$W"/av/*.whl 2>&1 | tail -n 5
export PYTHONPATH="$PYTHONPATH:/tmp/fa4"

if [[ "${4:-}" == fa3 ]]; then
  step "FlashAttention-3: building its head-dim-128 forward in the background ($R/fa3-build.log)"
  (python3 lab/fa3_build.py --src "${FA3_SRC:?}" --cutlass "${CUTLASS_SRC:?}" --target /tmp/fa3 \
    --jobs "$(nproc)" >"$R/fa3-build.log" 2>&1
    echo "rc=$?" >>"$R/fa3-build.log") &
  fa3_pid=$!
  # cuDNN's FP8 attention through its Python frontend (WH/cfe: the nvidia-cudnn-frontend wheel, 12 MB), if carried:
  # on Hopper cuDNN declines FP8 attention with bf16 output (2026-12-07), so it is timed only where asked
  if [[ -n "${CUDNN_FP8:-}" ]] && compgen -G "$W/cfe/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa4 "$W"/cfe/*.whl 2>&1 | tail -n 3
    step "attention kernels at the DiT's shapes (cuDNN, cuDNN FP8)"
    PYTHONUNBUFFERED=1 python3 lab/gpu_attention.py --out "$R/attn-a" --steps attn \
      --attn-only cudnn_bf16,cudnn_fp8s --no-attn-sweep 2>&1 | tee "$R/attn-a.log" | tail -n 10
  fi
  step "FlashAttention-3: waiting for its build"
  wait "$fa3_pid"
  tail -n 3 "$R/fa3-build.log"
  export PYTHONPATH="$PYTHONPATH:/tmp/fa3"
  python3 -c "from fvrt.plugins import fa3_attention as f; import torch; print('fa3:', f.supported(torch.device('cuda')))"
  step "GPU tests: the fa3fp8 and fa3 ops (error, CUDA-graph capture)"
  gpu_tests fa3-tests tests/test_fa3_attention.py
  wait "$sage_pid"
  tail -n 2 "$R/sage-build.log"
  export PYTHONPATH="$PYTHONPATH:/tmp/sage"
  step "attention kernels at the DiT's shapes (cuDNN, FA3 bf16, FA3 FP8, sage)"
  PYTHONUNBUFFERED=1 python3 lab/gpu_attention.py --out "$R/attn-b" --steps attn \
    --attn-only cudnn_bf16,fa3_bf16,fa3_fp8s,fa3_fp8s_fused,sage_all --no-attn-sweep 2>&1 | tee "$R/attn-b.log" | tail -n 10
  step "full-size DiT engines, one run: cudnn,fa3,fa3fp8,sage"
  PYTHONUNBUFFERED=1 FVRT_CXX=g++-12 python3 lab/gpu_build_engines.py --stages dit --attention cudnn,fa3,fa3fp8,sage \
    --repeats 2 --out "$R/engines" 2>&1 | tee "$R/engines.log" | tail -n 16
  step "eager full-size DiT with FA3 FP8, as the engines route it"
  PYTHONUNBUFFERED=1 python3 lab/gpu_attention.py --out "$R/dit-b" --steps dit --dit-attention fa3fp8 \
    --dit-keep-ends - --dit-fp8-linears= --no-dit-flash --no-dit-fast-accum 2>&1 | tee "$R/dit-b.log" | tail -n 6
  step "done (fa3)"
  exit 0
fi

if [[ "${4:-}" == minimal ]]; then  # a few minutes of device time: the build, the kernel table, the op's tests
  wait "$sage_pid"
  tail -n 4 "$R/sage-build.log"
  export PYTHONPATH="$PYTHONPATH:/tmp/sage"
  step "attention kernels at the DiT's shapes (cuDNN, sage, fp8s)"
  PYTHONUNBUFFERED=1 python3 lab/gpu_attention.py --out "$R/attn" --steps attn --attn-only cudnn_bf16,sage_all,fp8s \
    --no-attn-sweep 2>&1 | tee "$R/attn.log" | tail -n 12
  step "GPU tests: SageAttention op"
  gpu_tests sage-tests tests/test_sage_attention.py -k "not engines"
  step "done (minimal)"
  exit 0
fi

if [[ "${4:-}" == engines ]]; then  # the DiT engines cuDNN vs sage again, after the cuDNN-first fix (~9 min)
  lowering_test_then_sage
  step "full-size DiT engines, one run: cudnn,sage"
  PYTHONUNBUFFERED=1 FVRT_CXX=g++-12 python3 lab/gpu_build_engines.py --stages dit --attention cudnn,sage \
    --repeats 2 --out "$R/engines" 2>&1 | tee "$R/engines.log" | tail -n 12
  step "done (engines)"
  exit 0
fi

step "GPU tests: FP8 attention kernels"
gpu_tests fp8-kernel-tests tests/test_fp8_attention.py -k "not engines"

step "SageAttention 2: waiting for its build"
wait "$sage_pid"
tail -n 4 "$R/sage-build.log"
export PYTHONPATH="$PYTHONPATH:/tmp/sage"
python3 -c "from fvrt.plugins import sage_attention as s; import torch; print('sage:', s.version(), s.supported(torch.device('cuda')))"

step "GPU tests: SageAttention op"
gpu_tests sage-tests tests/test_sage_attention.py -k "not engines"

step "attention kernels at the DiT's shapes"
if [[ "${4:-}" == quick ]]; then  # the kernels that matter for the choice, no tile sweep
  attn_args=(--attn-only cudnn_bf16,flash2_bf16,sage_all,fp8s,fp8s_tok --no-attn-sweep)
else
  attn_args=()
fi
PYTHONUNBUFFERED=1 python3 lab/gpu_attention.py --out "$R/attn" --steps attn "${attn_args[@]}" 2>&1 |
  tee "$R/attn.log" | tail -n 30

step "eager full-size DiT per attention"
PYTHONUNBUFFERED=1 python3 lab/gpu_attention.py --out "$R/dit" --steps dit --dit-attention sage,sage_all,fp8s \
  --dit-keep-ends sage --dit-fp8-linears ",sage" --no-dit-flash --no-dit-fast-accum 2>&1 | tee "$R/dit.log" |
  tail -n 30

step "FlashAttention-4: its wheels (at most FA4_WAIT_S, 60 s)"
for _ in $(seq "${FA4_WAIT_S:-60}"); do
  [[ -f "$W/fa4.ready" ]] && break
  sleep 1
done
attentions=cudnn,sage
if [[ -f "$W/fa4.ready" ]]; then
  lib="$W/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl"
  cat "$W"/cu13.part-* >"$lib"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4 "$W"/fa4/*.whl "$lib" \
    2>&1 | tail -n 5
  # nvidia-cutlass-dsl puts its `cutlass` package on sys.path with a .pth file, which a --target folder on
  # PYTHONPATH does not run: name the folder itself
  export PYTHONPATH="$PYTHONPATH:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages"
  python3 -c "from fvrt.plugins import fa4_attention as f; import torch; print('fa4:', f.version(), f.supported(torch.device('cuda')))"
  step "GPU tests: FlashAttention-4 op and its shipped kernels"
  gpu_tests fa4-tests tests/test_fa4_attention.py -k "not engines"
  attentions="$attentions,fa4"
else
  echo "FA4's wheels did not arrive: going on without FA4"
fi

if [[ "${4:-}" == quick ]]; then
  step "done (quick)"
  exit 0
fi

step "full-size DiT engines, one run: $attentions"
PYTHONUNBUFFERED=1 FVRT_CXX=g++-12 python3 lab/gpu_build_engines.py --stages dit --attention "$attentions" \
  --repeats 2 --out "$R/engines" 2>&1 | tee "$R/engines.log" | tail -n 40

step "GPU tests: sage, FA4 and smoothed FP8 engines through the pipeline (one shared cuDNN build)"
FVRT_CXX=g++-12 gpu_tests engine-tests tests/test_sage_attention.py tests/test_fa4_attention.py \
  tests/test_fp8_attention.py -k engines

step "done"
