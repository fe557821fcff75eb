#!/usr/bin/env bash
# Instructions per malloc+free pair of the LD_PRELOAD library against glibc, counted by
# callgrind (loop included; 1,000,000 pairs minus a 10,000-pair run).
# Usage: tools/callgrind-preload.sh [sizes...]   (default 16 256 4096)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p spanheap-preload >/dev/null 2>&1
lib=$PWD/target/release/libspanheap_preload.so
bin=$(mktemp -d)/c-pair
gcc -O2 -o "$bin" tools/c-pair.c
sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(16 256 4096)
total() {
  local out pre=$1
  shift
  out=$(mktemp)
  if [ "$pre" = 1 ]; then
    LD_PRELOAD=$lib valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" "$@" >/dev/null 2>&1
  else
    valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" "$@" >/dev/null 2>&1
  fi
  callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
  rm -f "$out"
}
for s in "${sizes[@]}"; do
  for pre in 1 0; do
    full=$(total $pre "$s" 1010000)
    base=$(total $pre "$s" 10000)
    name=$([ $pre = 1 ] && echo spanheap-preload || echo glibc)
    echo "$name pair $s $(( (full - base) / 1000000 ))"
  done
done
