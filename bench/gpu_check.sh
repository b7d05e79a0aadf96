#!/usr/bin/env bash
# The GPU check with the machine's own Python (no venv, no install): bash bench/gpu_check.sh [REPORT_DIR] [--dry]
# REPORT_DIR (default runs/gpu-check) receives gpu_report.md + gpu_report.json; PYTHON=... picks another Python.
# What it runs and its time boxes: bench/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null; then
    echo "error: no $PYTHON on PATH (set PYTHON=/path/to/python)" >&2
    exit 2
fi
exec "$PYTHON" bench/gpu_check.py "$@"
