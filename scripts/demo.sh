#!/usr/bin/env bash
# The whole job on a fresh machine, on a local SecantusDB server:
#   1. install SecantusDB (once) and build archiver,
#   2. seed realistic data with `archiver simulate`,
#   3. archive the history with `archiver batch`,
#   4. run `archiver watch` while `archiver simulate --live` delivers orders,
#   5. show what got archived (`archiver verify`, metrics, a sample document),
#   6. archive the same history into a Delta Lake table and query it.
# Everything lives in .demo/ (server data, logs, token); run it again to start over.
#   DEMO_SECONDS=60 scripts/demo.sh    # a longer live phase
#   DEMO_KEEP=1 scripts/demo.sh        # leave the server and watch running afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
DEMO=.demo
SECONDS_LIVE="${DEMO_SECONDS:-20}"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Installing SecantusDB (if missing) and building archiver"
scripts/secantusd.sh install
cargo build --release --locked --quiet
BIN=target/release/archiver

say "Starting a local SecantusDB server"
[ -f "$DEMO/secantus/secantusd.pid" ] && scripts/secantusd.sh stop "$DEMO/secantus"
rm -rf "$DEMO"
mkdir -p "$DEMO"
MONGODB_URI="$(scripts/secantusd.sh start "$DEMO/secantus")"
export MONGODB_URI MONGODB_DB=livraison
export LOG_DIR="$DEMO/logs" RESUME_TOKEN_FILE="$DEMO/resume_token.json" HTTP_ADDR=127.0.0.1:9464
echo "server: $MONGODB_URI"

cleanup() {
  [ -n "${WATCH_PID:-}" ] && kill -TERM "$WATCH_PID" 2>/dev/null && wait "$WATCH_PID" 2>/dev/null
  if [ -z "${DEMO_KEEP:-}" ]; then scripts/secantusd.sh stop "$DEMO/secantus"; fi
}
trap cleanup EXIT

say "Seeding: archiver simulate --count 2000 --seed 42 --p-delivered 0.4 --drop"
$BIN simulate --count 2000 --seed 42 --p-delivered 0.4 --drop

say "Archiving the history: archiver batch --date-from 90d"
$BIN batch --date-from 90d

say "Running archiver watch, while simulate --live delivers orders for ${SECONDS_LIVE} s"
$BIN watch 2> "$DEMO/watch.log" &
WATCH_PID=$!
for _ in $(seq 1 100); do
  curl -fs "http://$HTTP_ADDR/health/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fs "http://$HTTP_ADDR/health/ready" && echo
$BIN simulate --count 0 --live --rate 20 --duration "$SECONDS_LIVE"
sleep 1

say "What watch did (last log lines)"
grep -E "batch archived" "$DEMO/watch.log" | tail -n 5 || true
echo
curl -fs "http://$HTTP_ADDR/metrics" | grep -E '^archiver_(orders_archived|events_received|anomalies|batches)_total' || true

say "Stopping watch (SIGTERM: finishes its batch, saves its token, exits 0)"
kill -TERM "$WATCH_PID"; wait "$WATCH_PID"; echo "watch exited with $?"; WATCH_PID=

say "Checking the archive against the source: archiver verify --date-from 90d"
$BIN verify --date-from 90d || true

say "One enriched archive document (as batch would write it)"
$BIN batch --date-from 90d --dry-run --sample-size 1 | tail -n +2

say "The same history into a Delta Lake table: ARCHIVE_SINK=delta archiver batch --date-from 90d"
ARCHIVE_SINK=delta ARCHIVE_TABLE_URI="$PWD/$DEMO/lake/orders" $BIN batch --date-from 90d

say "A query over the table, with another implementation of Delta Lake (Python deltalake)"
PYTHON="$(scripts/lake-venv.sh)"
"$PYTHON" scripts/lake-query.py "$DEMO/lake/orders"

say "Done"
echo "Logs: $DEMO/logs/  Token: $RESUME_TOKEN_FILE  Delta table: $DEMO/lake/orders"
echo "(DEMO_KEEP=1 keeps the server running)"
