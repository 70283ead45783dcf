#!/usr/bin/env bash
# The soak (issue 32): the whole reference deployment on this machine (Tansu, PostgreSQL, three
# `weir serve`, a retry worker, an outbox relay) under a stream of customer events from a
# foreign producer and a seeded schedule of faults; then a report of every record's fate.
#
#   scripts/soak.sh                                  # 3 minutes, 100 records/s, a random seed
#   scripts/soak.sh --minutes 30 --rate 100 --seed 42
#   scripts/soak.sh --seed 42                        # replay a run's fault schedule
#   scripts/soak.sh --report-dir DIR                 # default target/soak
#
# It is the test tests/soak/main.rs, run alone with its settings in WEIR_SOAK_*; the suite
# (scripts/test.sh) runs the same test with the defaults. It prints the report's paths (JSON,
# Markdown, SVG) at the end and exits non-zero when the soak failed (a lost record, an order
# violation, an unexpected dead letter or a record left parked).
#
# Needs what scripts/test.sh installs: Tansu 0.6.0 (WEIR_TANSU_BIN, else cargo's bin dir) and
# the virtualenv .tmp/venv with confluent-kafka (WEIR_TEST_PYTHON). Run scripts/test.sh once
# first on a fresh machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

die() {
  printf 'scripts/soak.sh: error: %s\n' "$*" >&2
  exit 1
}

while (($#)); do
  case "$1" in
    --minutes) export WEIR_SOAK_MINUTES="${2:?--minutes needs a value}"; shift 2 ;;
    --rate) export WEIR_SOAK_RATE="${2:?--rate needs a value}"; shift 2 ;;
    --seed) export WEIR_SOAK_SEED="${2:?--seed needs a value}"; shift 2 ;;
    --report-dir) export WEIR_SOAK_REPORT_DIR="${2:?--report-dir needs a value}"; shift 2 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

CARGO_BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"
if [[ -z "${WEIR_TANSU_BIN:-}" ]]; then
  WEIR_TANSU_BIN=$(command -v tansu || echo "$CARGO_BIN_DIR/tansu")
fi
[[ -x "$WEIR_TANSU_BIN" ]] || die "Tansu not found ($WEIR_TANSU_BIN); run scripts/test.sh once, or set WEIR_TANSU_BIN"
export WEIR_TANSU_BIN
export WEIR_TEST_PYTHON="${WEIR_TEST_PYTHON:-$ROOT/.tmp/venv/bin/python}"
"$WEIR_TEST_PYTHON" -c 'import confluent_kafka' 2>/dev/null \
  || die "no confluent-kafka in $WEIR_TEST_PYTHON; run scripts/test.sh once, or set WEIR_TEST_PYTHON"
# The shared test server is used only when no private PostgreSQL cluster can be started.
export WEIR_TEST_DATABASE_URL="${WEIR_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

echo "soak: ${WEIR_SOAK_MINUTES:-3} min at ${WEIR_SOAK_RATE:-100} records/s, seed ${WEIR_SOAK_SEED:-random}"
status=0
cargo test --features testing --test soak -- --nocapture 2>&1 | tee "${TMPDIR:-/tmp}/weir-soak.log" || status=$?
echo
grep -E '^soak (report|picture):' "${TMPDIR:-/tmp}/weir-soak.log" || echo "soak: no report was written"
exit "$status"
