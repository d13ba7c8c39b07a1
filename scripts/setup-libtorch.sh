#!/usr/bin/env bash
# Installs a small CPU-only libtorch (for the tch crate) into .deps/libtorch.
# Idempotent: does nothing when the folder is complete.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.deps/libtorch"
stamp="$dest/.complete-2.13.0"
[ -f "$stamp" ] && exit 0

say() { echo "setup-libtorch: $*" >&2; }
py="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

say "downloading the torch 2.13.0 wheel and two CUDA runtime wheels (about 540 MB, cached by pip)"
"$py" -m pip download -q --no-deps --only-binary=:all: --dest "$work/whl" \
  torch==2.13.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85

rm -rf "$dest"
mkdir -p "$dest/lib" "$dest/include"
say "unpacking headers and the CPU libraries"
cd "$work"
for w in whl/*.whl; do
  case "$(basename "$w")" in
    torch-*)
      unzip -q "$w" 'torch/include/*' 'torch/lib/*' -d x
      cp -a x/torch/include/. "$dest/include/"
      for lib in libtorch_cpu.so libtorch.so libc10.so; do cp -a "x/torch/lib/$lib" "$dest/lib/"; done
      cp -a x/torch/lib/libgomp*.so* "$dest/lib/" 2>/dev/null || true
      ;;
    *)
      unzip -q -o "$w" -d y
      ;;
  esac
done
find y \( -name 'libcudart.so.13*' -o -name 'libcupti.so.13*' \) -exec cp -a {} "$dest/lib/" \;
# torch.libs holds libgomp in some wheel builds
find x -path '*torch.libs*' -name 'libgomp*' -exec cp -a {} "$dest/lib/" \; 2>/dev/null || true
for need in libtorch_cpu.so libtorch.so libc10.so; do
  [ -f "$dest/lib/$need" ] || { say "missing $need after unpacking; the wheel layout changed"; exit 1; }
done
ls "$dest/lib"/libcudart.so.13* >/dev/null 2>&1 || { say "missing libcudart.so.13"; exit 1; }
ls "$dest/lib"/libcupti.so.13* >/dev/null 2>&1 || { say "missing libcupti.so.13"; exit 1; }
touch "$stamp"
say "libtorch ready in $dest ($(du -sh "$dest" | cut -f1))"
