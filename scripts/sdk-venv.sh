#!/usr/bin/env bash
# The Python SDK as a user installs it: `pip install './sdk/python[nkeys]'` into a
# venv, by default a fresh one (.deps/sdk) that holds nothing else; with a
# venv folder as argument, into that one (the tests put it beside PyTorch in
# .deps/torch too). The SDK is reinstalled from the working tree whenever its
# files change (a few seconds). Prints the venv's bin folder (flame-py-worker,
# python).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.deps/sdk}"
if [ ! -x "$venv/bin/python" ]; then
    echo "sdk-venv: creating $venv" >&2
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
# A digest of the SDK's sources: reinstall when they change.
sum=$(cd "$root/sdk/python" && find . -type f \( -name '*.py' -o -name '*.toml' -o -name '*.md' -o -name 'py.typed' \) -not -path '*/build/*' -not -path '*.egg-info*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
stamp="$venv/.sdk-installed-$sum"
if [ ! -f "$stamp" ]; then
    echo "sdk-venv: pip install ./sdk/python into $venv" >&2
    # A copy, so the build leaves nothing (build/, *.egg-info) in the working tree.
    tmp=$(mktemp -d)
    cp -r "$root/sdk/python" "$tmp/python"
    # Without what an earlier build left (a stale build/ would be installed instead of the sources).
    rm -rf "$tmp/python/build" "$tmp/python"/src/*.egg-info
    # Its dependencies if missing, then the SDK itself afresh (nothing else reinstalled).
    "$venv/bin/pip" install -q --disable-pip-version-check "$tmp/python[nkeys]" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$tmp/python" >&2
    rm -rf "$tmp" "$venv"/.sdk-installed-* "$venv"/.installed-*
    "$venv/bin/python" -c "import flame_sdk, nats, nkeys, numpy, safetensors" >&2
    touch "$stamp"
fi
echo "$venv/bin"
