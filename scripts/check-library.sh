#!/usr/bin/env bash
# The claims the README makes about Weir as a library, checked:
#   - the import graph of src/ has no circle and follows src/lib.rs's layout map;
#   - a library build (`--no-default-features --features kafka`) stays small: at most
#     MAX_PACKAGES packages in `cargo tree`, and none of the binary's heavy dependencies;
#   - no reference-service type (TaskCreated, CustomerCreated, ...) is reachable from it: its
#     documentation, which lists every public item, names none of them.
# scripts/test.sh runs it; it takes about a minute once the dependencies are built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MAX_PACKAGES=100
LIBRARY_FEATURES=(--no-default-features --features kafka)
# What a library user must never pay for: the CLI, the reference service's web and image stacks.
FORBIDDEN_PACKAGES=(clap figment image reqwest sqlx axum tonic)

fail() {
  printf 'scripts/check-library.sh: %s\n' "$*" >&2
  exit 1
}

echo "--- import graph"
python3 scripts/import-graph.py

echo "--- cargo tree ${LIBRARY_FEATURES[*]}"
tree=$(cargo tree "${LIBRARY_FEATURES[@]}" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)
count=$(grep -c . <<<"$tree")
echo "$count packages (at most $MAX_PACKAGES)"
((count <= MAX_PACKAGES)) || fail "the library build has $count packages, more than $MAX_PACKAGES"
for package in "${FORBIDDEN_PACKAGES[@]}"; do
  if grep -qx "$package" <<<"$tree"; then
    fail "the library build depends on $package ($(cargo tree "${LIBRARY_FEATURES[@]}" -e normal -i "$package" --depth 3 | tr '\n' ' '))"
  fi
done

echo "--- reference-service names in the library's documentation"
# Every name the reference service defines as an item: structs, enums, consts, fns.
names=$(grep -hoE '^\s*pub\(crate\) (struct|enum|const) [A-Za-z_][A-Za-z0-9_]*' src/bin/weir/reference/events.rs |
  awk '{print $NF}' | sort -u)
[[ -n "$names" ]] || fail "found no item names in src/bin/weir/reference/events.rs"
doc_dir=target
# A fresh copy: pages left by a build with more features must not count.
rm -rf "$doc_dir/doc/weir"
# Broken intra-doc links are allowed here: some point at items only other features build.
RUSTDOCFLAGS="-A rustdoc::broken_intra_doc_links" cargo doc --quiet --no-deps --lib "${LIBRARY_FEATURES[@]}"
index="$doc_dir/doc/weir/all.html"
[[ -f "$index" ]] || fail "cargo doc wrote no $index"
found=()
for name in $names; do
  if grep -rqw --include='*.html' "$name" "$doc_dir/doc/weir"; then
    found+=("$name")
  fi
done
((${#found[@]} == 0)) || fail "the library's documentation names reference-service items: ${found[*]}"
echo "none of $(wc -w <<<"$names") names found"
