#!/usr/bin/env bash
# Carry flash-attn-4 (FA4, `flash_attn.cute`, a pure-python CuTe-DSL FlashAttention for Hopper /
# Blackwell) to the offline GPU machine, for `launch/profile_kernels.py --backends flash_attn_4`.
#
#   launch/fa4_wheels.sh          # from the repo root; FA4_CACHE (default /tmp/fa4) caches downloads
#
# Builds two git-ignored folders, each under 60 MiB, because all that travels with one device
# call (working tree, carried paths) must stay under 64 MiB:
#   .fa4a/cutlass_libs_cu12.tar.xz  nvidia-cutlass-dsl-libs-cu12 4.8.1 (the MLIR compiler and the
#                                   CuTe-DSL runtime, 235 MB unpacked, self-contained: libcuda is
#                                   dlopen'ed) unzipped and re-packed with xz -9 (the zip wheel is
#                                   92 MB, the tar.xz 62.86 MB = 59.95 MiB)
#   .fa4b/*.whl                     the other wheels (22.7 MB): flash-attn-4 4.0.0b36,
#                                   nvidia-cutlass-dsl 4.8.1 (-libs-base, -libs-core), apache-tvm-ffi,
#                                   cuda-bindings 12.9, cuda-pathfinder, quack-kernels,
#                                   torch-c-dlpack-ext
# Their other Requires-Dist the GPU image has (torch, einops, typing-extensions, protobuf; jax,
# pytest, nvdisasm are extras only). Its own cuda-bindings is there for CUDA 13; the 12.9 one
# carried here matches the cu12 flavour and comes first on PYTHONPATH. torch-c-dlpack-ext's
# prebuilt addons stop at torch 2.9 (and it imports `packaging`), but tvm-ffi only imports it when
# torch lacks Tensor.__dlpack_c_exchange_api__, which torch >= 2.10 has.
#
# On the GPU machine, two back-to-back calls (the machine stays warm; /tmp persists between them,
# an ignored folder in the repo does not: the tree is copied afresh for each call):
#   call 1, carry [".fa4a"]:
#     mkdir -p /tmp/fa4site/x && tar -xJf .fa4a/cutlass_libs_cu12.tar.xz -C /tmp/fa4site/x
#   call 2, carry [".fa4b"]:
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa4site/site .fa4b/*.whl \
#       && cp -r /tmp/fa4site/x/. /tmp/fa4site/site/ \
#       && export PYTHONPATH=/tmp/fa4site/site:/tmp/fa4site/site/nvidia_cutlass_dsl/dsl_packages:. \
#       && python3 -c 'import flash_attn.cute' \
#       && python3 launch/profile_kernels.py --out $OUT --backends flash_attn_4,sdpa_flash,sdpa_cudnn
# The libs wheel's top-level folder (nvidia_cutlass_dsl/: cu12/lib/libcute_dsl_runtime.so and
# dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu12.*.so) merges into the nvidia_cutlass_dsl/
# that -libs-base and -libs-core install, as pip would (no file is in two wheels); cutlass finds
# both by walking up from its own files to nvidia_cutlass_dsl/. It goes in after pip because
# `pip --target` skips a top-level folder that already exists. `cutlass` itself lives in
# nvidia_cutlass_dsl/dsl_packages/, which pip puts on sys.path through a .pth file; .pth files
# are only read in site directories, not in PYTHONPATH entries, hence the second PYTHONPATH entry.
# Checked on CPU with CPython 3.12 and torch 2.10: both calls' unpacking, pip and cp, then
# `import flash_attn.cute` (profile_kernels.py --list, which says whether flash_attn_4 imports,
# needs the GPU machine); without the dsl_packages entry the import fails with "No module named
# 'cutlass'".
# The script adds /.fa4a/, /.fa4b/ and /.fa4site/ to .git/info/exclude so none is ever committed.
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
cache=${FA4_CACHE:-/tmp/fa4}
py=${PYTHON:-python3}
limit=$((60 * 1024 * 1024))
mkdir -p "$cache"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for p in /.fa4a/ /.fa4b/ /.fa4site/; do
  grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >> "$exclude"
done
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)

# fetch REQUIREMENT FILE-PREFIX: the cached wheel whose name starts with FILE-PREFIX (downloaded
# into the cache first when there is none); prints its path.
fetch() {
  local req=$1 prefix=$2 f
  f=$(ls "$cache/$prefix"*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$f" ]; then
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plat[@]}" --pre -d "$cache" "$req" >&2
    f=$(ls "$cache/$prefix"*.whl | head -n 1)
  fi
  echo "$f"
}

# .fa4a: the cu12 libs wheel as tar.xz (members ./nvidia_cutlass_dsl/..., ./*.dist-info/...).
mkdir -p .fa4a
xz_cache="$cache/libs_cu12.tar.xz"
if ! { [ -s "$xz_cache" ] && tar -tJf "$xz_cache" | grep -q '^\./nvidia_cutlass_dsl_libs_cu12-4\.8\.1\.dist-info/'; }; then
  whl=$(fetch nvidia-cutlass-dsl-libs-cu12==4.8.1 nvidia_cutlass_dsl_libs_cu12-4.8.1-)
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  unzip -q "$whl" -d "$tmp"
  tar -C "$tmp" -cf - . | xz -9 -T0 > "$xz_cache.part"
  mv "$xz_cache.part" "$xz_cache"
fi
cp "$xz_cache" .fa4a/cutlass_libs_cu12.tar.xz

# .fa4b: everything else, pinned to the versions that were checked together.
rm -rf .fa4b
mkdir -p .fa4b
for spec in flash-attn-4==4.0.0b36:flash_attn_4-4.0.0b36- \
            nvidia-cutlass-dsl==4.8.1:nvidia_cutlass_dsl-4.8.1- \
            nvidia-cutlass-dsl-libs-base==4.8.1:nvidia_cutlass_dsl_libs_base-4.8.1- \
            nvidia-cutlass-dsl-libs-core==4.8.1:nvidia_cutlass_dsl_libs_core-4.8.1- \
            apache-tvm-ffi==0.1.15.post2:apache_tvm_ffi-0.1.15.post2- \
            cuda-bindings==12.9.4:cuda_bindings-12.9.4- \
            cuda-pathfinder==1.9.0:cuda_pathfinder-1.9.0- \
            quack-kernels==0.6.5:quack_kernels-0.6.5- \
            torch-c-dlpack-ext==0.1.5:torch_c_dlpack_ext-0.1.5-; do
  cp "$(fetch "${spec%%:*}" "${spec#*:}")" .fa4b/
done

for d in .fa4a .fa4b; do
  size=$(du -sb "$d" | cut -f1)
  echo "$d: $size bytes"
  if [ "$size" -ge "$limit" ]; then
    echo "fa4_wheels: $d is $size bytes, over the 60 MiB a device call can carry" >&2
    exit 1
  fi
done
