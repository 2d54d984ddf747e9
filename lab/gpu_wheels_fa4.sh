#!/usr/bin/env bash
# The wheels lab/gpu_lease_sage.sh needs on the GPU machine (Python 3.12, x86-64, nothing installable there), fetched
# here and laid out as one carry folder per device call (each call carries at most 64 MiB):
#   DIR/call1: av/ (PyAV, every test module needs it) and fa4/ (flash-attn-4 and its small dependencies)
#   DIR/call2, DIR/call3: cu13.part-* (nvidia-cutlass-dsl-libs-cu13, 92 MB, split in 40 MB pieces)
# Each call moves its folder to the repo's .whl (git-ignored) and passes carry [".whl"]; its command copies .whl/* to
# the job's wheel folder, and the last one touches WH/fa4.ready after its pieces are in place.
#
#   bash lab/gpu_wheels_fa4.sh /tmp/carry
set -euo pipefail

out=${1:?usage: gpu_wheels_fa4.sh DIR}
dl="$out/download"
mkdir -p "$dl"
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d "$dl" "$@"; }
get av==19.0.2
get flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 \
  torch-c-dlpack-ext==0.1.5 cuda-python==13.4.4 cuda-bindings==13.5.0 cuda-pathfinder==1.9.1 einops==0.8.2

rm -rf "$out"/call1 "$out"/call2 "$out"/call3
mkdir -p "$out"/call1/av "$out"/call1/fa4 "$out"/call2 "$out"/call3
mv "$dl"/av-*.whl "$out"/call1/av/
lib=$(ls "$dl"/nvidia_cutlass_dsl_libs_cu13-*.whl)
split -b 40M -a 2 "$lib" "$dl/cu13.part-"
rm "$lib"
mv "$dl"/cu13.part-aa "$out"/call2/
mv "$dl"/cu13.part-* "$out"/call3/
mv "$dl"/*.whl "$out"/call1/fa4/
rmdir "$dl"
du -sh "$out"/call*
