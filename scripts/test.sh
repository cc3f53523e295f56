#!/usr/bin/env bash
# The test command: lint + format check + the offline test suite (tiny models built in code, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check replugchar tests benchmarks scripts
ruff format --check replugchar tests benchmarks scripts
python -m pytest -q "$@"
