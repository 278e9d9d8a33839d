#!/usr/bin/env bash
# Installs the browser the dashboard's browser test drives (tests/e2e/test_dashboard.py), only when
# missing: Debian's headless-capable Chromium and its ChromeDriver (/usr/bin/chromium,
# /usr/bin/chromedriver). Selenium (a dev extra) talks to that driver; nothing is downloaded at
# test time. Needs root (apt-get); CI and developers run as root on this project's machines.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
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
