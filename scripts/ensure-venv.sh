#!/bin/sh
# Make sure VENV is a virtualenv of Python 3.11, the version pyproject.toml requires.
# A virtualenv made with another (or a broken) Python is removed and made again, so `make setup`
# recovers by itself instead of failing until someone runs `make clean`.
# Usage: scripts/ensure-venv.sh VENV PYTHON
set -eu
VENV=$1
PYTHON=$2
is_311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; }

if [ -e "$VENV" ]; then
    if [ -x "$VENV/bin/python" ] && is_311 "$VENV/bin/python"; then
        exit 0
    fi
    found=$("$VENV/bin/python" --version 2>&1 || echo "a broken or missing Python")
    echo "$VENV was made with $found, but Tollgate needs Python 3.11: rebuilding it" >&2
    rm -rf "$VENV"
fi
for candidate in "$PYTHON" python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && is_311 "$candidate"; then
        echo "creating $VENV with $candidate"
        exec "$candidate" -m venv "$VENV"
    fi
done
echo "Python 3.11 is needed to build $VENV: install it, or run make PYTHON=/path/to/python3.11" >&2
exit 1
