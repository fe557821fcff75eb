#!/usr/bin/env bash
# Instructions per operation of each allocator's fast path, counted by callgrind
# (repeatable, unlike wall time). Usage: tools/callgrind-fastpath.sh [allocators...]
# Prints: allocator workload size instructions-per-op (1,000,000 ops, warm-up subtracted).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --example fastpath >/dev/null 2>&1
bin=target/release/examples/fastpath
allocs=("$@")
[ ${#allocs[@]} -eq 0 ] && allocs=(spanheap mimalloc jemalloc system)
total() {
  local out
  out=$(mktemp)
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" "$@" >/dev/null 2>&1
  callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
  rm -f "$out"
}
for a in "${allocs[@]}"; do
  for w in pair batch; do
    for s in 16 256 4096; do
      full=$(total "$a" "$w" "$s")
      base=$(total "$a" "warmup-$w" "$s")
      echo "$a $w $s $(( (full - base) / 1000000 ))"
    done
  done
  # The suite's churned live set: one free and one allocation per step, ~50 of the
  # instructions are the benchmark's own (random numbers, the live-set array).
  full=$(total "$a" churn 0)
  base=$(total "$a" warmup-churn 0)
  echo "$a churn - $(( (full - base) / 1000000 ))"
done
