#!/usr/bin/env bash
# Installs the browser the dashboard's browser test drives (tests/e2e/test_dashboard.py), only when
# missing: Debian's headless-capable Chromium and its ChromeDriver (/usr/bin/chromium,
# /usr/bin/chromedriver). Selenium (a dev extra) talks to that driver; nothing is downloaded at
# test time.
set -euo pipefail
exec "$(dirname "$0")/install-missing.sh" chromium chromedriver=chromium-driver
