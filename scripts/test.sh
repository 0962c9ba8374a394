#!/usr/bin/env bash
# The project's test command: lint, format check, then the test suite (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
python3 -m pytest "$@"
