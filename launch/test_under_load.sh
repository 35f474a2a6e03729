#!/usr/bin/env bash
# Find flakes by force: run chosen test files ROUNDS times, each round in a new shuffled order, while
# busy loops hold every CPU core. A test that waits for elapsed time or another program's flush
# instead of an observable state fails here long before it fails at random in CI.
#
#   bash launch/test_under_load.sh [--rounds N] [--busy N] [--subprocess] [TEST_FILE ...] [-- PYTEST_ARGS]
#
#   --rounds N      rounds (default 3); every round's seed and time are logged, failures summed at the end
#   --busy N        busy loops (default: one per core, `nproc`)
#   --subprocess    every test file that starts another process (torchrun, SLURM, S3, netns, CLIs)
#
# The exit status is non-zero when any round failed; each round's pytest output is in
# $LOAD_LOG_DIR (default: a new folder under /tmp), named by round and seed.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3
busy=$(nproc)
files=()
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --busy) busy=$2; shift 2 ;;
        --subprocess)
            mapfile -t found < <(grep -lE 'run_module|start_module|subprocess|slurm|s3_server|netns' tests/test_*.py)
            files+=("${found[@]}"); shift ;;
        --) shift; pytest_args=("$@"); break ;;
        *) files+=("$1"); shift ;;
    esac
done
[ ${#files[@]} -gt 0 ] || { echo "name test files or --subprocess" >&2; exit 2; }
bash launch/setup_env.sh
log_dir=${LOAD_LOG_DIR:-$(mktemp -d /tmp/dist_kp-load.XXXXXX)}
mkdir -p "$log_dir"

busy_pids=()
stop_busy() { [ ${#busy_pids[@]} -eq 0 ] || kill "${busy_pids[@]}" 2>/dev/null || true; }
trap stop_busy EXIT
for _ in $(seq "$busy"); do
    ( while :; do :; done ) &
    busy_pids+=($!)
done
echo "load: $busy busy loops on $(nproc) cores; ${#files[@]} files; $rounds rounds; logs in $log_dir"

failed=0
for round in $(seq "$rounds"); do
    seed=$RANDOM$RANDOM
    started=$(date +%s)
    log="$log_dir/round$round-seed$seed.log"
    if bash launch/test.sh --shuffle "$seed" "${files[@]}" "${pytest_args[@]}" >"$log" 2>&1; then
        status=passed
    else
        status=FAILED
        failed=$((failed + 1))
    fi
    echo "round $round seed $seed: $status in $(( $(date +%s) - started )) s ($(tail -n 1 "$log"))"
    grep -E '^(FAILED|ERROR) ' "$log" || true
done
echo "$failed of $rounds rounds failed"
[ "$failed" -eq 0 ]
