#!/usr/bin/env bash
# Instructions per no-op record, in process, counted by callgrind: deterministic where msgs/s on a
# shared machine is not. Each in-process arm of `weir bench` runs alone under callgrind; a run
# that only prepares the records (`mem-setup`) is subtracted, and the rest divided by the records.
#
#   cargo build --release && scripts/bench-instructions.sh            # 20,000 records
#   RECORDS=50000 scripts/bench-instructions.sh
#
# W runs at the service's default log level (JSON, info) unless RUST_LOG says otherwise;
# W [error] with the filter switched to error, as in `weir bench`.
set -euo pipefail
records=${RECORDS:-20000}
bin=${WEIR_BIN:-target/release/weir}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
# CALLGRIND_DIR keeps the profiles (for callgrind_annotate); by default they are thrown away.
if [ -n "${CALLGRIND_DIR:-}" ]; then
    out=$CALLGRIND_DIR
    mkdir -p "$out"
else
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
fi

count() {
    valgrind --tool=callgrind --callgrind-out-file="$out/$1.%p" \
        "$bin" bench --only "$1" --records "$records" --rounds 1 >"$out/$1.stdout" 2>"$out/$1.stderr"
    grep -h "Collected" "$out/$1.stderr" | awk '{ total += $NF } END { print total }'
}

setup=$(count mem-setup)
printf '%-14s %16s %14s\n' arm instructions per-record
printf '%-14s %16s %14s\n' mem-setup "$setup" -
for arm in mem-a1 mem-w mem-w-error; do
    total=$(count "$arm")
    awk -v arm="$arm" -v t="$total" -v s="$setup" -v n="$records" \
        'BEGIN { printf "%-14s %16s %14.0f\n", arm, t, (t - s) / n }'
done
