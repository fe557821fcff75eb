/* C semantics of spanheap-preload's exports, run under LD_PRELOAD by tests/preload.rs.
 * Usage: abi <expected-library-substring>   -> prints "abi: ok" and exits 0.
 *        abi fork                           -> the fork test.
 * Every check prints what failed and exits 1. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* C23's free_sized / free_aligned_sized: this glibc has neither, so they are looked
 * up at run time (and must come from the preloaded library). */
static void (*free_sized)(void *, size_t);
static void (*free_aligned_sized)(void *, size_t, size_t);

#define CHECK(c)                                                                      \
    do {                                                                              \
        if (!(c)) {                                                                   \
            fprintf(stderr, "abi: %s:%d: check failed: %s (errno %d)\n", __FILE__,    \
                    __LINE__, #c, errno);                                             \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

static void fill(void *p, size_t n, unsigned char v) { memset(p, v, n); }
static int all(const void *p, size_t n, unsigned char v) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != v) return 0;
    return 1;
}

static void *cross_free(void *arg) {
    void **ps = arg;
    for (int i = 0; i < 1000; i++) {
        CHECK(all(ps[i], 1 + i % 700, (unsigned char)i));
        free(ps[i]);
    }
    return NULL;
}

/* --- life cycle: before main, TLS destructors, thread exit, after main ------------- */

/* A constructor runs before main (and before the program's own initialisation); the
 * C library has called malloc before it, while starting up. */
static int early_ok;
__attribute__((constructor(101))) static void early(void) {
    char *p = malloc(100);
    char *q = calloc(10, 10);
    void *a = NULL;
    if (p && q && q[99] == 0 && posix_memalign(&a, 4096, 100) == 0 && a) {
        memset(p, 1, 100);
        p = realloc(p, 100000);
        early_ok = p != NULL && p[99] == 1;
    }
    free(p);
    free(q);
    free(a);
}

/* glibc's C++ thread_local destructor registration; it calls calloc itself. */
extern int __cxa_thread_atexit_impl(void (*)(void *), void *, void *);
extern void *__dso_handle;

static volatile int tls_dtor_ok, key_dtor_ok;

static void tls_dtor(void *arg) {
    /* At thread exit, before the pthread key destructors. */
    void *p = malloc(64 + (size_t)(uintptr_t)arg);
    void *q = malloc(200000);
    if (p && q) tls_dtor_ok++;
    free(p);
    free(q);
}

static pthread_key_t key;

/* Re-arms itself twice, so that its last rounds run after spanheap's own key
 * destructor has retired the thread's cache: those allocations and frees take the
 * cache-less path. */
static void key_dtor(void *arg) {
    uintptr_t round = (uintptr_t)arg;
    char *p = malloc(48);
    char *q = calloc(1, 70000);
    if (p && q && q[69999] == 0) {
        memset(p, 3, 48);
        if (round == 3) key_dtor_ok = 1;
    }
    free(p);
    free(q);
    if (round < 3) pthread_setspecific(key, (void *)(round + 1));
}

static void *lifecycle_thread(void *arg) {
    (void)arg;
    /* The first allocation of this thread happens inside the registration. */
    if (__cxa_thread_atexit_impl(tls_dtor, (void *)1, &__dso_handle) != 0) return NULL;
    if (__cxa_thread_atexit_impl(tls_dtor, (void *)2, &__dso_handle) != 0) return NULL;
    pthread_setspecific(key, (void *)1);
    void *p = malloc(10);
    free(p);
    return NULL;
}

/* Runs after main has returned. */
static void after_main(void) {
    void *p = malloc(1000), *q = malloc(1 << 20);
    if (!p || !q || malloc_usable_size(p) < 1000) {
        fprintf(stderr, "abi: allocation after main failed\n");
        _exit(1);
    }
    free(p);
    free(q);
}

static void lifecycle(void) {
    CHECK(early_ok);
    CHECK(pthread_key_create(&key, key_dtor) == 0);
    for (int i = 0; i < 4; i++) {
        tls_dtor_ok = 0;
        key_dtor_ok = 0;
        pthread_t t;
        CHECK(pthread_create(&t, NULL, lifecycle_thread, NULL) == 0);
        CHECK(pthread_join(t, NULL) == 0);
        CHECK(tls_dtor_ok == 2);
        CHECK(key_dtor_ok == 1);
    }
    CHECK(atexit(after_main) == 0);
}

static void semantics(const char *expect) {
    /* The preloaded library answers. */
    Dl_info info;
    void *m = dlsym(RTLD_DEFAULT, "malloc");
    CHECK(m != NULL && dladdr(m, &info) != 0 && info.dli_fname != NULL);
    if (!strstr(info.dli_fname, expect)) {
        fprintf(stderr, "abi: malloc comes from %s, not %s\n", info.dli_fname, expect);
        exit(1);
    }
    CHECK(dladdr(dlsym(RTLD_DEFAULT, "free"), &info) && strstr(info.dli_fname, expect));
    CHECK(dladdr(dlsym(RTLD_DEFAULT, "posix_memalign"), &info) &&
          strstr(info.dli_fname, expect));
    free_sized = (void (*)(void *, size_t))dlsym(RTLD_DEFAULT, "free_sized");
    free_aligned_sized =
        (void (*)(void *, size_t, size_t))dlsym(RTLD_DEFAULT, "free_aligned_sized");
    CHECK(free_sized && dladdr((void *)free_sized, &info) && strstr(info.dli_fname, expect));
    CHECK(free_aligned_sized && dladdr((void *)free_aligned_sized, &info) &&
          strstr(info.dli_fname, expect));

    /* malloc(0): unique pointers. */
    void *z1 = malloc(0), *z2 = malloc(0);
    CHECK(z1 && z2 && z1 != z2);
    CHECK(malloc_usable_size(z1) >= 1);
    free(z1);
    free(z2);
    /* free(NULL), malloc_usable_size(NULL). */
    free(NULL);
    CHECK(malloc_usable_size(NULL) == 0);

    /* Sizes, usable size, alignment, contents. */
    static const size_t sizes[] = {1,    7,    8,     9,     15,     16,      17,     24,
                                   100,  1000, 4095,  4096,  4097,   32768,   32769,  65536,
                                   1 << 20, (1 << 20) + 1, 3 << 20, 16 << 20};
    enum { NS = sizeof sizes / sizeof sizes[0] };
    void *ps[NS];
    for (int i = 0; i < NS; i++) {
        ps[i] = malloc(sizes[i]);
        CHECK(ps[i] != NULL);
        CHECK(malloc_usable_size(ps[i]) >= sizes[i]);
        if (sizes[i] > 8) CHECK((uintptr_t)ps[i] % 16 == 0);
        else CHECK((uintptr_t)ps[i] % 8 == 0);
        fill(ps[i], sizes[i], (unsigned char)i);
    }
    for (int i = 0; i < NS; i++) {
        CHECK(all(ps[i], sizes[i], (unsigned char)i));
        free(ps[i]);
    }

    /* calloc: zeroed, also over reused dirty memory. */
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < NS; i++) {
            unsigned char *p = calloc(1, sizes[i]);
            CHECK(p && all(p, sizes[i], 0));
            fill(p, sizes[i], 0xEE);
            free(p);
        }
    /* calloc overflow. */
    errno = 0;
    volatile size_t half = SIZE_MAX / 2; /* volatile: keep gcc from folding the call */
    CHECK(calloc(half, 3) == NULL && errno == ENOMEM);

    /* Sizes over PTRDIFF_MAX. */
    errno = 0;
    CHECK(malloc((size_t)PTRDIFF_MAX + 1) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(malloc(SIZE_MAX) == NULL && errno == ENOMEM);

    /* realloc: NULL allocates; contents kept across small/large; 0 frees. */
    char *r = realloc(NULL, 10);
    CHECK(r != NULL);
    memcpy(r, "0123456789", 10);
    size_t grow[] = {20, 300, 5000, 40000, 300000, 3 << 20, 70000, 500, 12};
    size_t keep = 10;
    for (size_t i = 0; i < sizeof grow / sizeof grow[0]; i++) {
        r = realloc(r, grow[i]);
        CHECK(r != NULL && malloc_usable_size(r) >= grow[i]);
        CHECK(memcmp(r, "0123456789", keep < 10 ? keep : 10) == 0);
        keep = grow[i] < keep ? grow[i] : keep;
        if (grow[i] > 8) CHECK((uintptr_t)r % 16 == 0);
    }
    /* realloc failure leaves the block intact. */
    errno = 0;
    CHECK(realloc(r, (size_t)PTRDIFF_MAX + 1) == NULL && errno == ENOMEM);
    CHECK(memcmp(r, "0123456789", 10) == 0);
    errno = 0;
    CHECK(reallocarray(r, SIZE_MAX / 2, 3) == NULL && errno == ENOMEM);
    CHECK(memcmp(r, "0123456789", 10) == 0);
    r = reallocarray(r, 100, 10);
    CHECK(r != NULL && malloc_usable_size(r) >= 1000 && memcmp(r, "0123456789", 10) == 0);
    CHECK(realloc(r, 0) == NULL); /* glibc: frees, returns NULL */

    /* free preserves errno, for small and large blocks (large frees may madvise). */
    for (int i = 0; i < NS; i++) {
        void *p = malloc(sizes[i]);
        errno = 4321;
        free(p);
        CHECK(errno == 4321);
    }
    errno = 77;
    free(NULL);
    CHECK(errno == 77);

    /* posix_memalign: errors leave the output untouched. */
    void *out = (void *)0x1234;
    CHECK(posix_memalign(&out, 0, 16) == EINVAL && out == (void *)0x1234);
    CHECK(posix_memalign(&out, 3, 16) == EINVAL && out == (void *)0x1234);
    CHECK(posix_memalign(&out, 4, 16) == EINVAL && out == (void *)0x1234);
    CHECK(posix_memalign(&out, 24, 16) == EINVAL && out == (void *)0x1234);
    CHECK(posix_memalign(&out, 64, (size_t)PTRDIFF_MAX + 1) == ENOMEM &&
          out == (void *)0x1234);
    /* Sweep: alignments 8 .. 4 MiB x sizes. */
    static const size_t asz[] = {0, 1, 8, 15, 16, 17, 100, 4095, 4096, 4097,
                                 32768, 65536, 65537, 1 << 20, 3 << 20};
    for (size_t a = 8; a <= (4u << 20); a *= 2)
        for (size_t i = 0; i < sizeof asz / sizeof asz[0]; i++) {
            void *p = NULL;
            CHECK(posix_memalign(&p, a, asz[i]) == 0 && p != NULL);
            CHECK((uintptr_t)p % a == 0);
            CHECK(malloc_usable_size(p) >= asz[i]);
            fill(p, asz[i], 0x5A);
            CHECK(all(p, asz[i], 0x5A));
            if (i % 2) free_aligned_sized(p, a, asz[i]);
            else free(p);
        }

    /* Larger alignments, up to 1 GiB (address space only). */
    for (size_t a = 8u << 20; a <= (1u << 30); a *= 2) {
        void *p = NULL;
        CHECK(posix_memalign(&p, a, 100) == 0 && p != NULL && (uintptr_t)p % a == 0);
        CHECK(malloc_usable_size(p) >= 100);
        fill(p, 100, 0x33);
        free(p);
        p = aligned_alloc(a, 3 << 20);
        CHECK(p != NULL && (uintptr_t)p % a == 0 && malloc_usable_size(p) >= (3u << 20));
        free(p);
    }

    /* aligned_alloc, memalign, valloc, pvalloc. */
    errno = 0;
    CHECK(aligned_alloc(3, 10) == NULL && errno == EINVAL);
    void *aa = aligned_alloc(256, 1000);
    CHECK(aa && (uintptr_t)aa % 256 == 0 && malloc_usable_size(aa) >= 1000);
    free(aa);
    void *ma = memalign(24, 10); /* rounded up to 32 */
    CHECK(ma && (uintptr_t)ma % 32 == 0);
    free(ma);
    long page = sysconf(_SC_PAGESIZE);
    void *va = valloc(100);
    CHECK(va && (uintptr_t)va % page == 0);
    free(va);
    void *pv = pvalloc(1);
    CHECK(pv && (uintptr_t)pv % page == 0 && malloc_usable_size(pv) >= (size_t)page);
    free(pv);

    /* free_sized. */
    void *fs = malloc(200);
    CHECK(fs);
    free_sized(fs, 200);

    /* Frees from another thread. */
    void *cross[1000];
    for (int i = 0; i < 1000; i++) {
        cross[i] = malloc(1 + i % 700);
        CHECK(cross[i]);
        fill(cross[i], 1 + i % 700, (unsigned char)i);
    }
    pthread_t t;
    CHECK(pthread_create(&t, NULL, cross_free, cross) == 0);
    CHECK(pthread_join(t, NULL) == 0);
}

/* --- fork: 100 forks from a thread while two others allocate ----------------------- */

static volatile int stop;

static void *churn(void *arg) {
    unsigned long x = (unsigned long)(uintptr_t)arg;
    void *keep[64] = {0};
    while (!stop) {
        x = x * 6364136223846793005UL + 1442695040888963407UL;
        int k = (x >> 33) % 64;
        free(keep[k]);
        size_t n = (x >> 60) == 0 ? 40000 + (x >> 20) % 400000 : 1 + (x >> 20) % 3000;
        keep[k] = malloc(n);
        if (keep[k]) memset(keep[k], 1, n < 64 ? n : 64);
    }
    for (int k = 0; k < 64; k++) free(keep[k]);
    return NULL;
}

static void *forker(void *arg) {
    int *failed = arg;
    for (int i = 0; i < 100; i++) {
        pid_t pid = fork();
        if (pid < 0) { *failed = 1; return NULL; }
        if (pid == 0) {
            /* The child allocates and frees at once, small and large. */
            for (int j = 0; j < 2000; j++) {
                char *p = malloc(1 + (j * 37) % 5000);
                if (!p) _exit(2);
                p[0] = 1;
                free(p);
            }
            void *big = malloc(3 << 20);
            if (!big) _exit(3);
            memset(big, 2, 3 << 20);
            free(big);
            _exit(0);
        }
        int status = 0;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "abi: fork child %d failed (status %d)\n", i, status);
            *failed = 1;
        }
    }
    return NULL;
}

static void fork_test(void) {
    alarm(60); /* a hung child hangs the parent's waitpid: fail loudly instead */
    pthread_t w[2], f;
    int failed = 0;
    for (int i = 0; i < 2; i++)
        CHECK(pthread_create(&w[i], NULL, churn, (void *)(uintptr_t)(i + 1)) == 0);
    CHECK(pthread_create(&f, NULL, forker, &failed) == 0);
    CHECK(pthread_join(f, NULL) == 0);
    stop = 1;
    for (int i = 0; i < 2; i++) CHECK(pthread_join(w[i], NULL) == 0);
    CHECK(!failed);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: abi <library-name> | abi fork\n");
        return 2;
    }
    if (strcmp(argv[1], "fork") == 0) {
        fork_test();
        printf("fork: ok\n");
        return 0;
    }
    semantics(argv[1]);
    lifecycle();
    printf("abi: ok\n");
    return 0;
}
