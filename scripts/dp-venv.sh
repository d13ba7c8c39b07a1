#!/usr/bin/env bash
# Google's dp-accounting in a venv of its own (.deps/dp): the reference the
# privacy accountant's test compares with. Prints the venv's python.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.deps/dp"
if [ ! -f "$venv/.installed-dp-accounting-0.4" ]; then
    echo "dp-venv: installing dp-accounting into $venv" >&2
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "dp-accounting==0.4.4" >&2
    "$venv/bin/python" -c "import dp_accounting" >&2
    touch "$venv/.installed-dp-accounting-0.4"
fi
echo "$venv/bin/python"
