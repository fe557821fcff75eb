/* Issue 26, "reuse address space", in C under the preload: with RLIMIT_AS set to
 * VmSize + 900 MiB, allocate blocks of 24 B .. 3 MB with malloc until it returns NULL,
 * free them all, then malloc(100 MiB) must succeed and be writable. A page of our own
 * is mapped just before and just after every 64 MiB-aligned region a block lands in
 * (where the address is free), as other mappings come to sit between a heap's arenas:
 * spanheap's arenas are then apart, no free run holds 100 MiB, and only arenas given
 * back to the OS make room. Prints "addrspace: ok" (the same line with glibc). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define MIB ((size_t)1 << 20)
#define ARENA (64 * MIB)
#define MAX_BLOCKS (1 << 18)
#define MAX_FENCES 4096

static void *blocks[MAX_BLOCKS];
static uintptr_t fences[MAX_FENCES];
static size_t nfences;
static struct rlimit saved;

static size_t vm_size(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t kib = 0;
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmSize: %zu kB", &kib) == 1) break;
    fclose(f);
    return kib * 1024;
}

static void restore(void) { setrlimit(RLIMIT_AS, &saved); }

static void fail(const char *msg) {
    restore();
    fprintf(stderr, "addrspace: %s\n", msg);
    exit(1);
}

static uint64_t rng = 0x5EEDAD05;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static size_t block_size(void) {
    const uint64_t min = 24, max = 3000000;
    if (next() % 2 == 0) return (size_t)(min + next() % (max - min + 1));
    uint64_t lo = min << (next() % 17);
    uint64_t n = lo + next() % lo;
    return (size_t)(n < max ? n : max);
}

static void fence_at(uintptr_t at) {
    for (size_t i = 0; i < nfences; i++)
        if (fences[i] == at) return;
    if (nfences == MAX_FENCES) return;
    fences[nfences++] = at;
    mmap((void *)at, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
}

static void fence_around(uintptr_t addr) {
    uintptr_t arena = addr & ~(uintptr_t)(ARENA - 1);
    fence_at(arena + ARENA);
    fence_at(arena - 4096);
}

int main(void) {
    if (getrlimit(RLIMIT_AS, &saved) != 0) return 2;
    struct rlimit rl = saved;
    rl.rlim_cur = vm_size() + 900 * MIB;
    if (setrlimit(RLIMIT_AS, &rl) != 0) return 2;

    size_t n = 0, bytes = 0;
    for (;;) {
        size_t sz = block_size();
        unsigned char *p = malloc(sz);
        if (!p) break;
        for (size_t off = 0; off < sz; off += 64 << 10) p[off] = 0xA5;
        p[sz - 1] = 0x5A;
        blocks[n++] = p;
        bytes += sz;
        fence_around((uintptr_t)p);
        fence_around((uintptr_t)p + sz - 1);
        if (n == MAX_BLOCKS) fail("the limit was never reached");
    }
    if (bytes < 300 * MIB) fail("the limit was reached too early");
    for (size_t i = 0; i < n; i++) free(blocks[i]);

    unsigned char *big = malloc(100 * MIB);
    if (!big) fail("malloc(100 MiB) after freeing everything returned NULL");
    for (size_t off = 0; off < 100 * MIB; off += 4096) big[off] = (unsigned char)(off >> 12 | 1);
    for (size_t off = 0; off < 100 * MIB; off += 4096)
        if (big[off] != (unsigned char)(off >> 12 | 1)) fail("the 100 MiB block lost a write");
    free(big);
    restore();
    printf("addrspace: ok\n");
    return 0;
}
