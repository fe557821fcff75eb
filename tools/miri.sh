#!/usr/bin/env bash
# Runs spanheap's unit tests under Miri (issue 20, "Undefined behaviour").
#
# Needs a nightly toolchain with the miri and rust-src components:
#   rustup component add miri rust-src --toolchain nightly && cargo +nightly miri setup
# Optional tooling: not part of CI; the product and its tests build on stable.
#
# Under Miri the tests' memory source is `os::StdMem` (std::alloc-backed, test-only)
# instead of `OsMemory`, since Miri cannot run mmap with PROT_NONE/MAP_FIXED or madvise;
# tests of OsMemory itself and of the global heap are #[cfg_attr(miri, ignore)].
# The tests leak their heaps on purpose (Box::leak), hence -Zmiri-ignore-leaks; the
# allocator turns addresses into pointers (span lookups), hence permissive provenance.
#
# Usage: tools/miri.sh [TEST_NAME...]   (default: the list below; each test is run on
# its own with --exact and a time limit of MIRI_TIMEOUT seconds, default 300)
#
# The default list is the tests that finished under Miri on a shared 2-core machine
# (each passed, no UB report): the pure ones within 60 s, the four cache tests (a real
# heap on StdMem: spans, windows, free stacks, flushes, span hand-offs between caches
# through the mcentral) in 30-75 s of test time each, after minutes of start-up. Every
# other unit test is ignored under Miri (see the cfg_attr(miri, ignore) reasons) or was
# not run to the end: the other MHeap tests, the PageAlloc tests that grow and then check
# invariants, and the brute-force/naive-search tests. They can be named on the command
# line with a larger MIRI_TIMEOUT (the default, 300 s, is per test).
set -u
cd "$(dirname "$0")/.."
export MIRIFLAGS="${MIRIFLAGS:--Zmiri-permissive-provenance -Zmiri-ignore-leaks}"
timeout_s="${MIRI_TIMEOUT:-300}"
if [ $# -gt 0 ]; then
    tests=("$@")
else
    tests=(
        fixalloc::tests::carves_recycles_and_reports_empty
        lockrank::tests::design_doc_lists_this_lock_order
        mcache::tests::a_local_free_leaves_the_object_alone
        mcache::tests::a_cache_takes_back_a_span_it_owned_last
        mcache::tests::an_exhausted_span_is_exchanged_for_a_partial_one_in_one_step
        mcache::tests::spans_other_threads_empty_are_kept_as_spares
        lockrank::tests::table_is_in_rank_order_without_gaps
        os::tests::page_size_supported_here
        os::tests::std_mem_gives_aligned_zeroed_memory_and_decommit_zeroes_it
        pagealloc::tests::const_constructible_and_send
        pagealloc::tests::highest_run_finds_the_top_run
        pagealloc::tests::merge_joins_runs_across_children
        pagealloc::tests::pack_round_trips_at_the_extremes
        pagealloc::tests::reference_heap_is_sane
        pagecache::tests::page_cache_allocates_runs_and_takes_frees_back
        raw_tests::rounded_sizes_get_16_byte_aligned_classes
        scavenger::tests::config_round_trips_and_off_is_none
        scavenger::tests::parses_settings
        sizeclasses::tests::invalid_inputs_do_not_panic
        sizeclasses::tests::layout_48_align_16_uses_the_48_byte_class
        sizeclasses::tests::objects_are_aligned_to_their_size
        sizeclasses::tests::tables_are_consistent
        sizeclasses::tests::tail_waste_is_at_most_an_eighth
        stats::tests::report_names_spanheap_and_lists_used_classes
        stats::tests::sections_are_seen_whole_and_totals_accumulate
    )
fi
cargo +nightly miri test --lib --no-run || exit 1
pass=() fail=() slow=()
for t in "${tests[@]}"; do
    echo "=== $t"
    timeout "$timeout_s" cargo +nightly miri test -q --lib -- --exact "$t"
    rc=$?
    if [ $rc -eq 0 ]; then pass+=("$t")
    elif [ $rc -eq 124 ]; then slow+=("$t")
    else fail+=("$t"); fi
done
echo "passed (${#pass[@]}): ${pass[*]}"
echo "failed (${#fail[@]}): ${fail[*]}"
echo "timed out after ${timeout_s}s (${#slow[@]}): ${slow[*]}"
[ ${#fail[@]} -eq 0 ] && [ ${#slow[@]} -eq 0 ]
