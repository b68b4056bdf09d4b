#!/usr/bin/env bash
# The GPU check (issue 21, docs/distributed.md): bench/gpu.py, every part within 440 s and stopped at
# 480 s whatever happens, writing one JSON file: $OUT/gpu.json where the device tool sets OUT, else
# bench/out/gpu.json (the file is rewritten after each part, so a stopped run keeps what it measured).
# Without a GPU it runs its parts at tiny sizes on the CPU, says it found no GPU, and exits 0.
# Usage: bash bench/gpu.sh [bench/gpu.py's options]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python=$(command -v python3 || command -v python)
timeout 480 "$python" bench/gpu.py "$@"
status=$?
[ "$status" -eq 124 ] && echo "bench/gpu.sh: stopped at 480 s; the JSON file holds the parts that ran"
exit "$status"
