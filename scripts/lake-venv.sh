#!/usr/bin/env bash
# Prints the path of a Python with the `deltalake` and `pyarrow` packages, an implementation of
# Delta Lake independent of archiver's, which the tests read archiver's tables back with. The
# virtual environment is created once per machine, under ~/.cache, and reused by every clone.
set -euo pipefail
VENV="${ARCHIVER_LAKE_VENV:-$HOME/.cache/archiver/lake-venv}"
# Pinned, so that a new release cannot change what an unchanged commit's tests see.
PACKAGES=("deltalake==1.6.6" "pyarrow==26.0.1")
if ! "$VENV/bin/python" -c 'import deltalake, pyarrow' >/dev/null 2>&1; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}" >&2
fi
echo "$VENV/bin/python"
