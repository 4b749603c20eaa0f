#!/usr/bin/env bash
# Check a GPU machine: the whole test suite (cuda tests included), a budgeted 4096 px render,
# the C++ host on CUDA, `nst bench` at 512, 1024 and 2048 px and the time-to-image renders.
# Each stage fits a 10-minute call; with 15 device minutes in all, run `fast` first:
#
#   bash bench/gpu_check.sh fast      # the cuda-marked tests only (parity of every fast path; a few minutes)
#   bash bench/gpu_check.sh bench     # nst bench --device cuda --sizes 512 1024 2048 (waterfall, baselines, profile)
#   bash bench/gpu_check.sh tti       # time to image: 512 px / 500 steps, 2048 px / 200 steps, cold and warm
#   bash bench/gpu_check.sh quality   # nst bench-quality at 2048 px / 20 s (adaptive plan vs equal split vs single)
#   bash bench/gpu_check.sh quality4k # the same at 4096 px / 60 s (about 8 min)
#   bash bench/gpu_check.sh suite     # pytest, everything (about 6 min on an H100 machine's CPUs)
#   bash bench/gpu_check.sh render    # 4096 px under --time-budget 45, timed from process start; C++ host on CUDA
#   bash bench/gpu_check.sh tiles     # nst bench-tiles on CUDA; a one-rank NCCL render; 8192 px under --time-budget 240
#   bash bench/gpu_check.sh all       # all of them in turn
#   bash bench/gpu_check.sh lent      # what matters, in one call of about 5 minutes (below)
#
# `lent` is the stage to run first whenever a GPU machine is lent (15 minutes in all, its
# start included, with room for one rerun): in order of importance, each part time-boxed,
# and the later parts skipped (a row says so) once the call has used LENT_S seconds
# (default 290; LENT_S=540 for one longer call where no rerun is needed): the cuda tests of
# the step variants, the kernels and the fast paths (80 s at most); nst bench at
# 512/1024/2048 with the strongest user loops and the engine's default step, whose trial
# times every step variant (what is left but 75 s); time to image at 512 px / 500 steps,
# cold and warm (75 s at most); then, if time is left, the 4096 px render under
# --time-budget 45 and the 2048 px / 20 s quality comparison. Its tables go to
# $OUT/bench/results/<gpu>/ (or bench/results/<gpu>/ without $OUT), as they are committed.
#
# Uses the machine's own torch (installs this project with --no-deps, never torch itself).
# Logs go to $LOGS (default: $OUT/gpu-check when $OUT is set, else bench/results/gpu-check):
# one <stage>.log per stage and summary.md, one row per check, printed last. nst bench writes
# its tables after every size and every time-to-image command, so a part stopped by its
# timeout still returns what it measured (marked partial).
#
# GPU_CHECK_DRY=FILE runs nothing heavy and needs no GPU: each command the stage would run
# (pytest, nst, torchrun) is appended to FILE, one shell-quoted line each; the small helper
# scripts still run. tests/test_gpu_check.py parses those lines with nst's own parser, so
# that a lent GPU's minutes are never lost to a mistyped flag.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${LOGS:-${OUT:+$OUT/gpu-check}}
LOGS=${LOGS:-bench/results/gpu-check}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
SUMMARY="$LOGS/summary.md"
[ -f "$SUMMARY" ] || printf '| stage | check | result | detail |\n| --- | --- | --- | --- |\n' > "$SUMMARY"

row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"; }

pyrun() {  # SECONDS, then python's arguments: a test, benchmark or render, offline, time-boxed
  local t=$1
  shift
  if [ -n "${GPU_CHECK_DRY:-}" ]; then
    printf '%q ' "$t" "$@" >> "$GPU_CHECK_DRY"
    echo >> "$GPU_CHECK_DRY"
    return 0
  fi
  NST_OFFLINE=1 timeout -k 10 "$t" $PY "$@"  # SIGTERM (a stop nst takes at a step), then SIGKILL 10 s later
}

setup() {
  if [ -n "${GPU_CHECK_DRY:-}" ]; then row setup "dry run (GPU_CHECK_DRY)" - "commands listed in $GPU_CHECK_DRY, none run"; return; fi
  $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA GPU visible to torch")' \
    || { row setup cuda FAIL "no CUDA GPU"; exit 1; }
  $PY -c 'import nst.engine' 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . || {
    row setup install FAIL "pip install -e . failed"; exit 1; }
  $PY -c 'import torch, nst; print("torch", torch.__version__, "nst", nst.__version__, torch.cuda.get_device_name())' \
    | tee -a "$LOGS/setup.log"
}

suite() {
  local log="$LOGS/suite.log"
  pyrun 580 -m pytest -q -rs -p no:cacheprovider > "$log" 2>&1
  local rc=$? line
  line=$(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$log" | tail -1)
  row suite "pytest (cuda tests included)" "$([ $rc = 0 ] && echo ok || echo FAIL)" "${line:-rc $rc}"
}

fast() {
  local log="$LOGS/fast.log"
  pyrun 400 -m pytest -q -rs -p no:cacheprovider -m cuda > "$log" 2>&1
  local rc=$? line
  line=$(grep -E 'passed|failed' "$log" | tail -1)
  row fast "pytest -m cuda" "$([ $rc = 0 ] && echo ok || echo FAIL)" "${line:-rc $rc}"
}

tti() {
  local log="$LOGS/tti.log"
  pyrun 580 -m nst bench --device cuda --no-waterfall --no-profile --no-onnx --name "$(gpu_slug)-time-to-image" \
    --out bench/results > "$log" 2>&1
  local rc=$?
  row tti "time to image, cold and warm" "$([ $rc = 0 ] && echo ok || echo FAIL)" \
    "$(grep -E '^wrote' "$log" | tail -1 | cut -c1-120)"
}

quality() {
  local size=${1:-2048} budget=${2:-20} log="$LOGS/quality-${1:-2048}.log"
  pyrun 580 -m nst bench-quality --device cuda --size "$size" --budget "$budget" --out bench/results > "$log" 2>&1
  local rc=$?
  row quality "bench-quality ${size} px / ${budget} s" "$([ $rc = 0 ] && echo ok || echo FAIL)" \
    "$(grep -E 'adaptive_over_equal' "$log" | tail -1 | cut -c1-120)"
}

quality4k() { quality 4096 60; }

render_4096() {  # [directory for the stats [timeout]]: 4096 px under --time-budget 45, from process start to image written
  local log="$LOGS/render.log" dir="$LOGS/render" stats="${1:-$LOGS/render}/render-4096-budget45.json"
  mkdir -p "$dir"
  $PY - "$dir" <<'PY' >> "$log" 2>&1
import sys
from nst.engine.demo import make_content, make_style
make_content(1600, 1200).save(f"{sys.argv[1]}/content.png")
make_style(1024, 1024, seed=1).save(f"{sys.argv[1]}/style.png")
PY
  local budget=45 start written
  start=$(date +%s.%N)
  pyrun "${2:-120}" -m nst stylize "$dir/content.png" --style "$dir/style.png" -o "$dir/out.png" \
    --weights random:0 --size 4096 --scales auto --time-budget $budget --device cuda --stats "$stats" >> "$log" 2>&1
  local rc=$?
  if [ $rc = 0 ] && [ -f "$dir/out.png" ]; then
    written=$($PY -c "import os, sys; print(f'{os.path.getmtime(sys.argv[1]) - float(sys.argv[2]):.1f}')" \
      "$dir/out.png" "$start")
    local ok=$($PY -c "print('ok' if $written <= $budget else 'FAIL')")
    row render "4096 px, --time-budget $budget, from process start to image written" "$ok" "${written} s"
  else
    row render "4096 px, --time-budget $budget" FAIL "exit $rc (see render.log)"
  fi
  rm -f "$dir"/out.png "$dir"/content.png "$dir"/style.png  # only the tables and logs go back from $OUT
}

render() {
  local log="$LOGS/render.log"
  render_4096
  # The C++ host on CUDA against the Python engine on CUDA (the test builds the host).
  pyrun 280 -m pytest -q -p no:cacheprovider tests/test_cpp_host.py -k cuda >> "$log" 2>&1
  rc=$?
  row render "C++ host --device cuda matches Python (fp32)" "$([ $rc = 0 ] && echo ok || echo FAIL)" \
    "$(grep -E 'passed|failed|skipped|error' "$log" | tail -1)"
}

tiles() {
  local log="$LOGS/tiles.log" dir="$LOGS/tiles"
  mkdir -p "$dir"
  pyrun 280 -m nst bench-tiles --device cuda --no-ranks-comm --out bench/results >> "$log" 2>&1
  local rc=$?
  row tiles "nst bench-tiles (tiled vs untiled ms/step)" "$([ $rc = 0 ] && echo ok || echo FAIL)" \
    "$(grep -E 'x untiled' "$log" | tr '\n' ';' | cut -c1-160)"
  $PY - "$dir" <<'PY' >> "$log" 2>&1
import sys
from nst.engine.demo import make_content, make_style
make_content(1600, 1200).save(f"{sys.argv[1]}/content.png")
make_style(1024, 1024, seed=1).save(f"{sys.argv[1]}/style.png")
PY
  # One NCCL rank: the collectives and the lead/worker protocol on a GPU.
  pyrun 120 -m torch.distributed.run --standalone --nproc-per-node 1 -m nst stylize \
    "$dir/content.png" --style "$dir/style.png" -o "$dir/nccl.png" --weights random:0 --size 1024 --steps 10 \
    --tile 512 --distributed --device cuda --stats "$dir/nccl.json" >> "$log" 2>&1
  rc=$?
  row tiles "one-rank NCCL render, 1024 px, 512 px tiles" "$([ $rc = 0 ] && echo ok || echo FAIL)" \
    "$(grep -E '^wrote' "$log" | tail -1 | cut -c1-120)"
  local budget=240 start written
  start=$(date +%s.%N)
  pyrun 330 -m nst stylize "$dir/content.png" --style "$dir/style.png" -o "$dir/out8k.png" \
    --weights random:0 --resize 8192x8192 --time-budget $budget --device cuda --stats "$dir/8k.json" >> "$log" 2>&1
  rc=$?
  if [ $rc = 0 ] && [ -f "$dir/out8k.png" ]; then
    written=$($PY -c "import os, sys; print(f'{os.path.getmtime(sys.argv[1]) - float(sys.argv[2]):.1f}')" \
      "$dir/out8k.png" "$start")
    row tiles "8192 px, --time-budget $budget (tiles from the memory plan)" \
      "$($PY -c "print('ok' if $written <= $budget else 'FAIL')")" \
      "${written} s; $($PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(f\"tile {d['tile']}, {d['steps_run']} steps\")" "$dir/8k.json")"
  else
    row tiles "8192 px, --time-budget $budget" FAIL "exit $rc (see tiles.log)"
  fi
  rm -f "$dir"/*.png
}

bench() {
  local log="$LOGS/bench.log"
  pyrun 580 -m nst bench --device cuda --sizes 512 1024 2048 --no-time-to-image --out bench/results > "$log" 2>&1
  local rc=$?
  row bench "nst bench --sizes 512 1024 2048" "$([ $rc = 0 ] && echo ok || echo FAIL)" \
    "$(grep -E '^wrote' "$log" | tail -1 | cut -c1-120)"
}

gpu_slug() {
  if [ -n "${GPU_CHECK_DRY:-}" ]; then echo dry-run-gpu; return; fi
  $PY -c 'import torch, re; print(re.sub("[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))'
}

lent_left() { echo $(( ${LENT_S:-290} - SECONDS )); }

lent_t() {  # CAP RESERVE: a part's timeout, at most CAP seconds and leaving RESERVE for the parts after it
  local t=$(( $(lent_left) - $2 ))
  t=$(( t < $1 ? t : $1 ))
  echo $(( t < 1 ? 1 : t ))  # never 0: to `timeout` that means no limit
}

lent_part() {  # name, seconds: true when the part may start (time left), else a "skipped" row
  local left=$(lent_left)
  if [ "$left" -lt "$2" ]; then row lent "$1" skipped "out of time (${left} s left of ${LENT_S:-290})"; return 1; fi
}

lent() {
  SECONDS=0
  local slug res log="$LOGS/lent.log" rc
  slug=$(gpu_slug)
  res="${OUT:+$OUT/}bench/results/$slug"
  mkdir -p "$res"
  # 1. The cuda tests of what the fast step is made of: the variants and their trial, the
  #    Triton kernels (their bf16 dots and the hand-off between programs, which Triton's
  #    interpreter cannot check), the Gram operator, the stylize fast paths.
  if lent_part "cuda tests" 60; then
    pyrun 80 -m pytest -q -rs -p no:cacheprovider -m cuda tests/test_variants.py tests/test_kernels.py \
      tests/test_gram_op.py tests/test_stylize.py > "$LOGS/lent-tests.log" 2>&1
    rc=$?
    row lent "pytest -m cuda: variants, kernels, Gram, stylize" "$([ $rc = 0 ] && echo ok || echo FAIL)" \
      "$(grep -E 'passed|failed' "$LOGS/lent-tests.log" | tail -1)$([ $rc = 124 ] && echo ' (timed out at 80 s)')"
  fi
  # 2. nst bench at 512, 1024, 2048 px: the engine's default step against eager PyTorch and
  #    the strongest user loops (reduce-overhead, the loss or the whole step compiled: faster
  #    than the default mode at every size on an H100; `bench` runs all four). The engine row
  #    runs the step-variant trial (its cache is fresh here), which times graph, compiled and
  #    kernels with the parity check: the table lists each one's ms. No ONNX, no profile.
  #    The tables are written after every row, so a timeout keeps what was measured.
  if lent_part "nst bench 512 1024 2048" 150; then
    pyrun $(lent_t 400 75) -m nst bench --device cuda --sizes 512 1024 2048 \
      --rows eager user_compile_ro user_whole_ro engine --repeats 3 --steps 10 --no-time-to-image --no-profile \
      --no-onnx --out "$res" --name "$slug" >> "$log" 2>&1
    rc=$?
    row lent "nst bench 512 1024 2048 (eager, user loops, engine with its trial)" \
      "$([ $rc = 0 ] && echo ok || echo "FAIL (exit $rc$([ $rc = 124 ] && echo ', timed out: partial tables'))")" \
      "$(grep -E 'vs_fastest_baseline|Partial' "$res/$slug.md" 2>/dev/null | tr '\n' ';' | cut -c1-200)"
  fi
  # 3. Time to image, 512 px / 500 steps, cold and warm (the engine's defaults first: the
  #    5 s goal is theirs); written after each command.
  if lent_part "time to image" 40; then
    pyrun $(lent_t 75 0) -m nst bench --device cuda --no-waterfall --no-profile \
      --no-onnx --renders 512:500 --out "$res" --name "$slug-time-to-image" >> "$log" 2>&1
    rc=$?
    row lent "time to image 512 px / 500 steps, cold and warm" "$([ $rc = 0 ] && echo ok || echo "FAIL (exit $rc)")" \
      "$(grep -E '^\| 512 px|time_to_image_warm_s|Partial' "$res/$slug-time-to-image.md" 2>/dev/null | tr '\n' ';' | cut -c1-200)"
  fi
  # 4. The 4096 px render under --time-budget 45, from process start to image written.
  if lent_part "4096 px render" 70; then
    render_4096 "$res" $(lent_t 120 0)
  fi
  # 5. If time is left: the 2048 px / 20 s quality comparison (issue #18).
  if lent_part "quality 2048 px / 20 s" 100; then
    pyrun $(lent_left) -m nst bench-quality --device cuda --size 2048 --budget 20 --out "$res" >> "$log" 2>&1
    rc=$?
    row lent "bench-quality 2048 px / 20 s" "$([ $rc = 0 ] && echo ok || echo FAIL)" \
      "$(grep -E 'adaptive_over_equal' "$log" | tail -1 | cut -c1-120)"
  fi
  cp "$SUMMARY" "$res/gpu-check-summary.md"
}

stage=${1:-}
case "$stage" in
  fast|suite|render|bench|tti|quality|quality4k|tiles|lent) setup; "$stage" ;;
  all) setup; fast; bench; tti; quality; quality4k; suite; render; tiles ;;
  *) echo "usage: bash bench/gpu_check.sh lent|fast|bench|tti|quality|quality4k|suite|render|tiles|all" >&2; exit 2 ;;
esac
echo
cat "$SUMMARY"
