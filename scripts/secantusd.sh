#!/usr/bin/env bash
# Installs (if missing) and starts SecantusDB's secantusd-rs, the MongoDB-compatible server we
# develop and test against. It is GPL-2.0 and runs as a separate process; nothing links it.
#
#   scripts/secantusd.sh install              install the pinned version if it is not there
#   scripts/secantusd.sh start DIR [PORT]     start on DIR (port 0 = any free port), wait until it
#                                             answers, print its URI; pid in DIR/secantusd.pid
#   scripts/secantusd.sh stop DIR             stop the server started on DIR
set -euo pipefail

SECANTUS_VERSION="0.5.3-beta.196"
export PATH="$HOME/.cargo/bin:$PATH"

log() { echo "secantusd.sh: $*" >&2; }

install() {
  if command -v secantusd-rs >/dev/null 2>&1 \
     && secantusd-rs --help 2>&1 | head -1 | grep -q "$SECANTUS_VERSION"; then
    return 0
  fi
  log "installing secantusd-rs $SECANTUS_VERSION (about 8 minutes on 2 cores, once per machine)"
  if ! command -v cmake >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq cmake >/dev/null
  fi
  # --ignore-rust-version: it declares rust-version 1.98; it builds and runs on our toolchain.
  cargo install secantus-mdb --version "$SECANTUS_VERSION" --ignore-rust-version --locked --quiet
}

start() {
  local dir="$1" port="${2:-0}"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [ -f "$dir/secantusd.pid" ] && kill -0 "$(cat "$dir/secantusd.pid")" 2>/dev/null; then
    cat "$dir/uri"
    return 0
  fi
  : > "$dir/secantusd.out"
  # SECANTUS_EXTRA_ARGS may hold several flags (the fault tests pass "--oplog-max-entries 50"):
  # split on whitespace, without glob expansion.
  local extra_args=()
  read -r -a extra_args <<< "${SECANTUS_EXTRA_ARGS:-}"
  # Small cache and log files: tests start several servers on one 2-core machine.
  nohup secantusd-rs --host 127.0.0.1 --port "$port" --storage-path "$dir/data" \
    --cache-size 512M --log-file-max 32MB "${extra_args[@]}" \
    >>"$dir/secantusd.out" 2>&1 &
  echo $! > "$dir/secantusd.pid"
  local addr=""
  for _ in $(seq 1 300); do
    addr="$(sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' "$dir/secantusd.out" | head -1)"
    [ -n "$addr" ] && break
    if ! kill -0 "$(cat "$dir/secantusd.pid")" 2>/dev/null; then
      log "secantusd-rs exited at start:"; cat "$dir/secantusd.out" >&2; return 1
    fi
    sleep 0.1
  done
  [ -n "$addr" ] || { log "secantusd-rs did not start in 30 s"; cat "$dir/secantusd.out" >&2; return 1; }
  # directConnection: one node, whatever replica-set name it advertises.
  echo "mongodb://$addr/?directConnection=true" | tee "$dir/uri"
}

stop() {
  local dir="$1"
  [ -f "$dir/secantusd.pid" ] || return 0
  local pid; pid="$(cat "$dir/secantusd.pid")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/secantusd.pid"
}

case "${1:-}" in
  install) install ;;
  start) install; start "${2:?usage: start DIR [PORT]}" "${3:-0}" ;;
  stop) stop "${2:?usage: stop DIR}" ;;
  *) echo "usage: $0 install | start DIR [PORT] | stop DIR" >&2; exit 2 ;;
esac
