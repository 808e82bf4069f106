#!/usr/bin/env bash
# One command: install with the dev extra, then run every test tier (unit, API on SQLite and
# PostgreSQL, end-to-end with real server and worker processes).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "[dev]" || exit 1
# The browser test (tests/test_browser.py) drives Debian's Chromium through Playwright.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium) || echo "could not install chromium"
fi
.venv/bin/python -m pytest -q -rs "$@"
rc=$?
# pytest exits 5 when it collected no test (e.g. a -k that matches nothing): not a failure.
if [ "$rc" -eq 5 ]; then echo "no tests ran"; exit 0; fi
exit "$rc"
