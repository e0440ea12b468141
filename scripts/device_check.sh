#!/usr/bin/env bash
# The first run on an accelerator, in one go: at most 5.5 minutes (every
# step has a hard timeout), well under 5 when the targets below are met.
#
#   bash scripts/device_check.sh [OUT_DIR]      # default: device_check/
#
# Writes JSON lines to OUT_DIR/device_check.jsonl, one per measurement,
# each with the device kind, platform, dtype and jax version:
#   * SPEAR's proposal block at m = 1000, b = 20 and 25: proposals/s
#     (median and min over 3 warm repeats) and the time to a certified
#     recovery (--mode=throughput);
#   * time to a certified recovery, float64 and float32: SPEAR b = 20, 25
#     at m = 1000; SPEAR++ b = 100 at m = 1000 and b = 210 at m = 4000
#     (the sweep; each record has the attack's seconds, its per-phase
#     timings with compile time, and the process's peak RSS).
# Every matrix product that decides exactness runs at
# Precision.HIGHEST in the library (TF32 would break exact linear
# algebra), so float32 here is true float32. Targets on one H100/H200:
# SPEAR b = 25 at m = 1000 in under 10 s; SPEAR++ b = 210 at m = 4000 in
# under 60 s. Nothing is downloaded: the bundled images are used.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-device_check}"
mkdir -p "$out"
log="$out/device_check.jsonl"
python - <<'PY'
import jax
print("backend:", jax.default_backend(), jax.devices())
PY
bench() { timeout "$1" python scripts/benchmark.py --output="$log" "${@:2}" || echo "exit $? for: ${*:2}" >&2; }
# 1. SPEAR's proposal throughput and time to certified recovery.
bench 45 --mode=throughput --ms=1000 --bs=20,25 --repeats=3
# 2. Time to a certified recovery, both dtypes, no warm-up (compile time
#    is in each record's stats_timings).
for dtype in float64 float32; do
  bench 40 --methods=spear --ms=1000 --bs=20,25 --trials=1 --nowarmup \
    --dtypes="$dtype" --time_budget_s=12
  bench 40 --methods=spearpp --ms=1000 --bs=100 --trials=1 --nowarmup \
    --dtypes="$dtype" --time_budget_s=25
  bench 75 --methods=spearpp --ms=4000 --bs=210 --trials=1 --nowarmup \
    --dtypes="$dtype" --time_budget_s=60
done
echo "wrote $log"
