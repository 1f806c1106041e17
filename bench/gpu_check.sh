#!/usr/bin/env bash
# The GPU checks of issues 8 and 18 in one go, for a session with one GPU (H100/H200), in at most
# 9 minutes: the time limits of the default parts add up to 490 s (their real durations on a GPU are
# not measured yet: no GPU so far). A part that reaches its limit is stopped, reported, and the next
# one runs. Every log goes to $OUT; read $OUT/summary.txt first. The exit status is the number of
# parts that failed.
#
#   part       limit  what
#   env         15 s  versions, the device
#   tests      150 s  the GPU tests: tests/test_gpu.py and the stream-mode GPU tests of tests/test_stateful.py
#   ddp         75 s  the multi-rank path on one GPU (tests/test_gpu_ddp.py): DDP forced on in one process
#                     over NCCL (graphs vs eager, a bidirectional model), 2 torchrun ranks over gloo
#   precision   60 s  bf16: the LSTM kernels' dtypes (torch.profiler; no fp16 kernel may appear), the
#                     gradient cosine against fp32 (>= 0.999), host syncs of an eager step (bench/gpu_precision.py)
#   e2e        190 s  bench/gpu_e2e.py at check sizes (20,000 ragged samples, 160 steps; word LM 150 steps):
#                     graphs on vs off on the same batches, distlstm vs the bare loop on the same batches
#                     (goal >= 1.8x with graphs), lm stream mode vs the textbook loop (goal >= 3x)
# Not in the default set (each fits a command of its own):
#   e2e_full 420 s (bench/gpu_e2e.py at full sizes), graphs 150 s (bench/gpu_profile.py: ms per step,
#   launches, GPU busy time with graphs on vs off), train_step 120 s (bench/train_step.py),
#   host 180 s (bench/host_path.py):
#   PARTS="e2e_full" OUT=/some/dir bash bench/gpu_check.sh
#
#   OUT=/some/dir bash bench/gpu_check.sh          # the default parts, full sizes
#   TINY=1 OUT=/tmp/x bash bench/gpu_check.sh      # small sizes: a smoke run, also on a CPU
#   PARTS="env precision" bash bench/gpu_check.sh  # a subset
# Without CUDA, the GPU tests are skipped, and the benchmarks run only with TINY (saying "not measured").
# Without the braceexpand package (a GPU machine that cannot install it), bench/shims/braceexpand.py
# stands in for it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PARTS=${PARTS:-"env tests ddp precision e2e"}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$OUT/summary.txt"
: > "$summary"
if ! python -c "import braceexpand" 2>/dev/null; then
    export PYTHONPATH="$PWD/bench/shims:$PYTHONPATH"
    echo "braceexpand not installed: bench/shims/braceexpand.py stands in for it" | tee -a "$summary"
fi
if [[ -n "${TINY:-}" ]]; then
    SIZE="--tiny"; QUICK="--quick"; STEP_SIZE="--hidden 64 --batch 8 --seq 16 --vocab 500 --steps 3"
    CHECK_E2E="--tiny --samples 500 --steps 12 --random-batches 2 --wordlm-steps 12 --wordlm-bare-steps 5"
else
    SIZE=""; QUICK=""; STEP_SIZE=""
    CHECK_E2E="--samples 20000 --steps 160 --random-batches 40 --wordlm-steps 150 --wordlm-bare-steps 100"
fi
CUDA=$(python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
failed=0

part() {  # part NAME LIMIT_S NEEDS COMMAND...: run COMMAND, log to $OUT/NAME.log, record the outcome.
          # NEEDS: any (always runs), gpu (needs CUDA), bench (needs CUDA, or TINY=1 for a smoke run)
    local name=$1 limit=$2 needs=$3 why=""; shift 3
    [[ " $PARTS " == *" $name "* ]] || return 0
    if [[ $CUDA != 1 && $needs == gpu ]]; then why="no CUDA device"; fi
    if [[ $CUDA != 1 && $needs == bench && -z "${TINY:-}" ]]; then why="no CUDA device; on a CPU only with TINY=1"; fi
    if [[ -n $why ]]; then
        echo "== $name: skipped ($why)" | tee -a "$summary"
        return 0
    fi
    local started=$SECONDS
    echo "== $name: $*" | tee -a "$summary"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc$([[ $rc == 124 ]] && echo " (stopped at its ${limit} s limit)"), $((SECONDS - started)) s, log $OUT/$name.log" | tee -a "$summary"
    if [[ $rc -ne 0 ]]; then failed=$((failed + 1)); tail -n 20 "$OUT/$name.log" | sed 's/^/   | /' >> "$summary"; fi
}

part env 15 any bash -c 'nvidia-smi || true; python -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA\")"; lscpu | grep -E "Model name|^CPU\(s\)"; date -u'
part tests 150 gpu python -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_stateful.py
part ddp 75 gpu python -m pytest -q -rs -m gpu tests/test_gpu_ddp.py
part precision 60 bench python bench/gpu_precision.py $SIZE --out "$OUT/gpu_precision.json"
part graphs 150 bench python bench/gpu_profile.py $SIZE --out "$OUT/traces"
part e2e 190 bench python bench/gpu_e2e.py $CHECK_E2E --out "$OUT/gpu_e2e.json"
part e2e_full 420 bench python bench/gpu_e2e.py $SIZE --out "$OUT/gpu_e2e_full.json"
part train_step 120 bench python bench/train_step.py $STEP_SIZE
part host 180 bench python bench/host_path.py $QUICK

{
    echo
    echo "== results"
    grep -hE "passed|failed|skipped" "$OUT/tests.log" 2>/dev/null | tail -n 1 || true
    grep -hE "passed|failed|skipped" "$OUT/ddp.log" 2>/dev/null | tail -n 1 | sed 's/^/ddp: /' || true
    grep -hE "^(device|startup|bf16 gradient|LSTM kernels|half-precision|host syncs|warnings|PASS|FAIL|not measured)" \
        "$OUT/precision.log" 2>/dev/null || true
    grep -hE "^(device|== |cuda graphs)" "$OUT/graphs.log" 2>/dev/null || true
    grep -vE "^(USDT|Warning)" "$OUT/e2e.log" 2>/dev/null || true
    grep -vE "^(USDT|Warning)" "$OUT/e2e_full.log" 2>/dev/null || true
    grep -hE "^(device|bare|Trainer|trainer)" "$OUT/train_step.log" 2>/dev/null || true
    grep -hE "^(machine|distlstm|model-free|item count|PASS|FAIL)" "$OUT/host.log" 2>/dev/null || true
} >> "$summary"
sed -n "/^== results/,\$p" "$summary"
exit "$failed"
