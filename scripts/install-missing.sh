#!/usr/bin/env bash
# Installs Debian packages for commands that are missing, and nothing else:
#   scripts/install-missing.sh COMMAND[=PACKAGE] ...
# (PACKAGE defaults to COMMAND). Shared by install-container-tools.sh and install-browser.sh.
# Needs root (apt-get); CI and developers run as root on this project's machines.
set -euo pipefail

missing=()
for spec in "$@"; do
    command -v "${spec%%=*}" >/dev/null 2>&1 || missing+=("${spec#*=}")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "installing: ${missing[*]}" >&2
if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get not found: install ${missing[*]} with your system's package manager" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
