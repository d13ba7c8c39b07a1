#!/usr/bin/env bash
# MLflow's tracking server in a venv of its own (.deps/mlflow): the real
# server the MLflow projection's tests log to and read back from. Prints the
# path of its `mlflow` command.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.deps/mlflow"
if [ ! -f "$venv/.installed-mlflow-3.17" ]; then
    echo "mlflow-venv: installing mlflow into $venv (about a minute)" >&2
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "mlflow==3.17.2" >&2
    "$venv/bin/mlflow" --version >&2
    touch "$venv/.installed-mlflow-3.17"
fi
echo "$venv/bin/mlflow"
