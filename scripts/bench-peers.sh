#!/usr/bin/env bash
# Weir against RustStream and hand-written rdkafka loops on Tansu (issue 31; BENCHMARKS.md,
# "Weir against RustStream (issue 31)"). Builds benches/peers in release mode, starts a Tansu
# broker with memory storage on a free port, runs the comparison against it (which creates and
# fills its topic), and stops the broker.
#
#   scripts/bench-peers.sh                          # 200,000 records, 3 rounds, both modes and
#                                                   # both configurations: about 10 minutes idle
#   scripts/bench-peers.sh --records 50000 --rounds 1 --modes broker-fed --settings shared
#   scripts/bench-peers.sh --help                   # every option of the bench
#
# Tansu: $WEIR_TANSU_BIN, else `tansu` on PATH, else $CARGO_HOME/bin/tansu (scripts/test.sh
# installs the pinned version there). Set WEIR_TANSU_LOG (e.g. info) for the broker's RUST_LOG;
# its log is printed if it fails to start.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
  printf 'scripts/bench-peers.sh: error: %s\n' "$*" >&2
  exit 1
}

CARGO_BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"
TANSU=
for candidate in "${WEIR_TANSU_BIN:-}" "$(command -v tansu || true)" "$CARGO_BIN_DIR/tansu"; do
  if [[ -n "$candidate" && -x "$candidate" ]]; then
    TANSU=$candidate
    break
  fi
done
[[ -n "$TANSU" ]] || die "no Tansu broker: set WEIR_TANSU_BIN, or run scripts/test.sh once (it installs Tansu)"

if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  exec cargo run --quiet --release -p weir-peers -- --help
fi

echo "building benches/peers (release)" >&2
cargo build --quiet --release -p weir-peers
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
BENCH="$TARGET_DIR/release/weir-peers"
[[ -x "$BENCH" ]] || die "no $BENCH after the build"

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

DIR=$(mktemp -d "${TMPDIR:-/tmp}/weir-peers.XXXXXX")
PID=
cleanup() {
  if [[ -n "$PID" ]]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  rm -rf "$DIR"
}
trap cleanup EXIT

# Below the kernel's ephemeral range, so no outgoing connection holds the port picked.
PORT=
for _ in $(seq 1 50); do
  candidate=$((20000 + RANDOM % 12000))
  if ! port_open 127.0.0.1 "$candidate"; then
    PORT=$candidate
    break
  fi
done
[[ -n "$PORT" ]] || die "no free port for the broker"

(
  cd "$DIR"
  RUST_LOG="${WEIR_TANSU_LOG:-warn}" exec "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --storage-engine memory://tansu/
) >"$DIR/broker.log" 2>&1 </dev/null &
PID=$!
for _ in $(seq 1 300); do # 30 s
  port_open 127.0.0.1 "$PORT" && break
  if ! kill -0 "$PID" 2>/dev/null; then
    cat "$DIR/broker.log" >&2 || true
    die "the Tansu broker exited at start"
  fi
  sleep 0.1
done
if ! port_open 127.0.0.1 "$PORT"; then
  cat "$DIR/broker.log" >&2 || true
  die "the Tansu broker did not accept connections on 127.0.0.1:$PORT within 30 s"
fi
echo "Tansu ($("$TANSU" --version 2>/dev/null || echo "version unknown")) on 127.0.0.1:$PORT, memory storage" >&2

status=0
"$BENCH" --brokers "127.0.0.1:$PORT" "$@" || status=$?
if ((status != 0)); then
  echo "--- last lines of the broker's log ---" >&2
  tail -n 30 "$DIR/broker.log" >&2 || true
fi
exit "$status"
