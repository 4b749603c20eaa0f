#!/usr/bin/env bash
# Check a GPU machine: the whole test suite (cuda tests included), a budgeted 4096 px render,
# the C++ host on CUDA, and `nst bench` at 512 and 2048 px. Each stage fits a 10-minute call:
#
#   bash bench/gpu_check.sh suite     # pytest, everything (about 6 min on an H100 machine's CPUs)
#   bash bench/gpu_check.sh render    # 4096 px under --time-budget 45, timed from process start; C++ host on CUDA
#   bash bench/gpu_check.sh bench     # nst bench --device cuda --sizes 512 2048
#   bash bench/gpu_check.sh all       # the three in turn
#
# Uses the machine's own torch (installs this project with --no-deps, never torch itself).
# Logs go to $LOGS (default: $OUT/gpu-check when $OUT is set, else bench/results/gpu-check):
# one <stage>.log per stage and summary.md, one row per check, printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${LOGS:-${OUT:+$OUT/gpu-check}}
LOGS=${LOGS:-bench/results/gpu-check}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
SUMMARY="$LOGS/summary.md"
[ -f "$SUMMARY" ] || printf '| stage | check | result | detail |\n| --- | --- | --- | --- |\n' > "$SUMMARY"

row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"; }

setup() {
  $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA GPU visible to torch")' \
    || { row setup cuda FAIL "no CUDA GPU"; exit 1; }
  $PY -c 'import nst.engine' 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . || {
    row setup install FAIL "pip install -e . failed"; exit 1; }
  $PY -c 'import torch, nst; print("torch", torch.__version__, "nst", nst.__version__, torch.cuda.get_device_name())' \
    | tee -a "$LOGS/setup.log"
}

suite() {
  local log="$LOGS/suite.log"
  NST_OFFLINE=1 timeout 580 $PY -m pytest -q -rs -p no:cacheprovider > "$log" 2>&1
  local rc=$? line
  line=$(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$log" | tail -1)
  row suite "pytest (cuda tests included)" "$([ $rc = 0 ] && echo ok || echo FAIL)" "${line:-rc $rc}"
}

render() {
  local log="$LOGS/render.log" dir="$LOGS/render"
  mkdir -p "$dir"
  $PY - "$dir" <<'PY' >> "$log" 2>&1
import sys
from nst.engine.demo import make_content, make_style
make_content(1600, 1200).save(f"{sys.argv[1]}/content.png")
make_style(1024, 1024, seed=1).save(f"{sys.argv[1]}/style.png")
PY
  local budget=45 start written
  start=$(date +%s.%N)
  NST_OFFLINE=1 timeout 300 $PY -m nst stylize "$dir/content.png" --style "$dir/style.png" -o "$dir/out.png" \
    --weights random:0 --size 4096 --scales auto --time-budget $budget --device cuda >> "$log" 2>&1
  local rc=$?
  if [ $rc = 0 ] && [ -f "$dir/out.png" ]; then
    written=$($PY -c "import os, sys; print(f'{os.path.getmtime(sys.argv[1]) - float(sys.argv[2]):.1f}')" \
      "$dir/out.png" "$start")
    local ok=$($PY -c "print('ok' if $written <= $budget else 'FAIL')")
    row render "4096 px, --time-budget $budget, from process start to image written" "$ok" "${written} s"
  else
    row render "4096 px, --time-budget $budget" FAIL "exit $rc (see render.log)"
  fi
  rm -f "$dir"/out.png
  # The C++ host on CUDA against the Python engine on CUDA (the test builds the host).
  NST_OFFLINE=1 timeout 280 $PY -m pytest -q -p no:cacheprovider tests/test_cpp_host.py -k cuda >> "$log" 2>&1
  rc=$?
  row render "C++ host --device cuda matches Python (fp32)" "$([ $rc = 0 ] && echo ok || echo FAIL)" \
    "$(grep -E 'passed|failed|skipped|error' "$log" | tail -1)"
}

bench() {
  local log="$LOGS/bench.log"
  NST_OFFLINE=1 timeout 580 $PY -m nst bench --device cuda --sizes 512 2048 --out bench/results > "$log" 2>&1
  local rc=$?
  row bench "nst bench --sizes 512 2048" "$([ $rc = 0 ] && echo ok || echo FAIL)" \
    "$(grep -E '^wrote' "$log" | tail -1 | cut -c1-120)"
}

stage=${1:-}
case "$stage" in
  suite|render|bench) setup; "$stage" ;;
  all) setup; suite; render; bench ;;
  *) echo "usage: bash bench/gpu_check.sh suite|render|bench|all" >&2; exit 2 ;;
esac
echo
cat "$SUMMARY"
