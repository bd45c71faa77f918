#!/usr/bin/env bash
# The performance benchmark, from a fresh clone: builds the release binary and the bench, starts
# a throwaway SecantusDB server, runs benches/pipeline.rs against it, stops the server (also on
# failure or Ctrl-C). Prints a table; writes target/bench/results.json.
#
#   scripts/bench.sh                              # full run: 100,000 orders, 3 runs per case
#   BENCH_ORDERS=20000 BENCH_RUNS=1 scripts/bench.sh        # quick check
#   BENCH_CASES=watch,latency BENCH_WATCH_BATCH_SIZES=100,2000 scripts/bench.sh
#
# Every BENCH_* setting is described at the top of benches/pipeline.rs. With BENCH_URI already
# set, that server is used instead (its database BENCH_DB, default "bench", is dropped and
# reseeded).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --locked
cargo bench --locked --bench pipeline --no-run

if [ -z "${BENCH_URI:-}" ]; then
  scripts/secantusd.sh install
  BENCH_SERVER_DIR="$(mktemp -d "${TMPDIR:-/tmp}/archiver-bench.XXXXXX")"
  trap 'scripts/secantusd.sh stop "$BENCH_SERVER_DIR"; rm -rf "$BENCH_SERVER_DIR"' EXIT
  BENCH_URI="$(scripts/secantusd.sh start "$BENCH_SERVER_DIR")"
  # Lets the bench report the server's CPU time per order next to each throughput.
  BENCH_SERVER_PID="$(cat "$BENCH_SERVER_DIR/secantusd.pid")"
  export BENCH_URI BENCH_SERVER_PID
fi
echo "benchmarking against $BENCH_URI on $(nproc) CPUs (load average: $(cut -d' ' -f1-3 /proc/loadavg))" \
  | sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#'

cargo bench --locked --bench pipeline
