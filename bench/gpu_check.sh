#!/usr/bin/env bash
# The GPU check of issue 8 in one go, for a session that has a GPU (H100/H200):
#   GPU tests, the end-to-end ragged benchmark and the word-LM shape (bench/gpu_e2e.py), a profiler
#   summary of launches per step (bench/gpu_profile.py), the fixed-shape trainer/bare ratio
#   (bench/train_step.py) and the host cost per step (bench/host_path.py). Every log goes to $OUT.
#
#   OUT=/some/dir bash bench/gpu_check.sh          # full sizes (duration not measured yet: no GPU so far;
#                                                  # the parts' limits below add up to 20 minutes)
#   TINY=1 OUT=/tmp/x bash bench/gpu_check.sh      # small sizes: a smoke run, also on a CPU
#   PARTS="tests e2e" bash bench/gpu_check.sh      # a subset: env tests e2e profile train_step host
#
# Where one command may run at most 10 minutes, run it as two: PARTS="env tests profile train_step"
# and PARTS="e2e host": at most 10 minutes each by the limits.
# Each part has its own time limit; a failing part is reported and the next one still runs. The
# exit status is the number of parts that failed. Read $OUT/summary.txt first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PARTS=${PARTS:-"env tests e2e profile train_step host"}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${TINY:-}" ]]; then
    SIZE="--tiny"; QUICK="--quick"; STEP_SIZE="--hidden 64 --batch 8 --seq 16 --vocab 500 --steps 3"
else
    SIZE=""; QUICK=""; STEP_SIZE=""
fi
summary="$OUT/summary.txt"
: > "$summary"
failed=0

part() {  # part NAME LIMIT_S COMMAND...: run COMMAND, log to $OUT/NAME.log, record the outcome
    local name=$1 limit=$2; shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    local started=$SECONDS
    echo "== $name: $*" | tee -a "$summary"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc, $((SECONDS - started)) s, log $OUT/$name.log" | tee -a "$summary"
    if [[ $rc -ne 0 ]]; then failed=$((failed + 1)); tail -n 20 "$OUT/$name.log" | sed 's/^/   | /' >> "$summary"; fi
}

part env 60 bash -c 'nvidia-smi || true; python -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA\")"; lscpu | grep -E "Model name|^CPU\(s\)"; date -u'
part tests 240 python -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_stateful.py
part e2e 420 python bench/gpu_e2e.py $SIZE --out "$OUT/gpu_e2e.json"
part profile 180 python bench/gpu_profile.py $SIZE --out "$OUT/traces"
part train_step 120 python bench/train_step.py $STEP_SIZE
part host 180 python bench/host_path.py $QUICK

{
    echo
    echo "== results"
    cat "$OUT/e2e.log" 2>/dev/null | grep -vE "^(USDT|Warning)" || true
    grep -hE "^(device|== |cuda graphs)" "$OUT/profile.log" 2>/dev/null || true
    grep -hE "^(device|bare|Trainer|trainer)" "$OUT/train_step.log" 2>/dev/null || true
    grep -hE "^(machine|distlstm|model-free|item count|PASS|FAIL)" "$OUT/host.log" 2>/dev/null || true
    grep -hE "passed|failed|skipped" "$OUT/tests.log" 2>/dev/null | tail -n 1 || true
} >> "$summary"
sed -n "/^== results/,\$p" "$summary"
exit "$failed"
