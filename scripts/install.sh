#!/usr/bin/env bash
# Creates .venv and installs gradwatch into it. torch goes first and pinned: 2.13.0 is the CPU
# wheel this kind of machine keeps on disk; the project's range admits it, so pip adds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".${extra}"
