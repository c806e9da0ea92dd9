#!/usr/bin/env bash
# Install fedrank with its test extras and run lint, types and the test suite (the README's second command).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test]'
ruff check .
mypy
python -m pytest -q "$@"
