#!/usr/bin/env bash
# Sets up and runs the whole test suite on a fresh machine: installs SecantusDB if missing,
# starts a throwaway server, runs the tests against it, stops it.
#
# With MONGODB_TEST_URI already set (a real MongoDB replica set), no server is started and the
# same tests run against that deployment.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# The fault tests (server restarts, pruned oplog) start SecantusDB servers of their own, so it
# is installed in every case.
scripts/secantusd.sh install
# The Delta Lake tests read archiver's tables back with the Python `deltalake` package, in a
# virtual environment created once per machine (~/.cache/archiver/lake-venv), and write tables
# on object storage through a local S3-compatible server, s3s-fs (pinned: later versions need
# a newer Rust), installed once per machine in ~/.cargo/bin (about 2 minutes).
scripts/lake-venv.sh >/dev/null
if ! command -v s3s-fs >/dev/null 2>&1; then
  cargo install --quiet --locked s3s-fs@0.14.1 --features binary
fi
if [ -z "${MONGODB_TEST_URI:-}" ]; then
  SECANTUS_TEST_DIR="$(mktemp -d "${TMPDIR:-/tmp}/archiver-test.XXXXXX")"
  export SECANTUS_TEST_DIR
  trap 'scripts/secantusd.sh stop "$SECANTUS_TEST_DIR"/main; rm -rf "$SECANTUS_TEST_DIR"' EXIT
  MONGODB_TEST_URI="$(scripts/secantusd.sh start "$SECANTUS_TEST_DIR/main")"
  export MONGODB_TEST_URI
fi
echo "testing against $MONGODB_TEST_URI" | sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#'
cargo test --locked "$@"
