#!/usr/bin/env bash
# Builds every wheel the image installs into build/wheels on the host, so the image build needs
# no network (containers here cannot reach the package index). Third-party wheels are fetched
# once per pyproject.toml; the tollgate wheel is rebuilt each time, reproducibly
# (SOURCE_DATE_EPOCH), so unchanged sources give a byte-identical wheel and a cached image layer.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
WHEELS="$ROOT/build/wheels"
mkdir -p "$WHEELS"
stamp="$WHEELS/.deps-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"

export SOURCE_DATE_EPOCH=315532800
if [ ! -e "$stamp" ]; then
    rm -f "$WHEELS"/*.whl "$WHEELS"/.deps-*
    "$PYTHON" -m pip wheel --quiet --wheel-dir "$WHEELS" "$ROOT"
    # Debian bookworm's python3.11 is 3.11.2: redis-py needs async-timeout below 3.11.3, which a
    # newer host Python does not resolve, so add it explicitly.
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" async-timeout
    touch "$stamp"
else
    rm -f "$WHEELS"/tollgate-*.whl
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" "$ROOT"
fi
