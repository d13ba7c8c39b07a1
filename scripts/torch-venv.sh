#!/usr/bin/env bash
# Installs PyTorch (torch==2.13.0, the version of the libtorch the workers
# link), numpy, safetensors and pyarrow into .deps/torch, for the PyTorch parity tests
# and for the examples' make_model.py scripts. Idempotent. About 4.7 GB: the
# Linux wheel imports only with its CUDA runtime wheels beside it, even on a
# CPU-only machine. Prints the venv's python.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.deps/torch"
stamp="$venv/.complete-2.13.0-pyarrow"
if [ ! -f "$stamp" ]; then
    echo "torch-venv: installing torch 2.13.0, numpy, safetensors, pyarrow into $venv (about 4.7 GB, cached)" >&2
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0 numpy safetensors pyarrow >&2
    "$venv/bin/python" -c "import torch, numpy, safetensors, pyarrow; assert torch.__version__.startswith('2.13.0'), torch.__version__" >&2
    touch "$stamp"
fi
echo "$venv/bin/python"
