#!/usr/bin/env bash
# One command: install, then serve the API + 1 embedded worker on the embedded SQLite database.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/gradwatch serve "$@"
