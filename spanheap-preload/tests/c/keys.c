/* Reentrancy of cache creation under the preload: the program creates 40 pthread keys
 * before its first malloc, so spanheap's own key (made on the first allocation) has an
 * index of 32 or more, and glibc's pthread_setspecific allocates (calloc) the second
 * level of the calling thread's key table while spanheap is creating that thread's
 * cache. Each new thread does the same on its first allocation. Prints "keys: ok". */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NKEYS 40
#define NTHREADS 8

static pthread_key_t keys[NKEYS];

static void check(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "keys: %s failed\n", what);
        exit(1);
    }
}

/* Allocates, fills and checks blocks of several sizes; sets the program's last key. */
static void *work(void *arg) {
    unsigned tag = (unsigned)(size_t)arg;
    void *blocks[64];
    for (int i = 0; i < 64; i++) {
        size_t n = 16 + (size_t)i * 97;
        blocks[i] = malloc(n);
        check(blocks[i] != NULL, "malloc");
        memset(blocks[i], (int)((tag + i) & 0xff), n);
    }
    check(pthread_setspecific(keys[NKEYS - 1], blocks[0]) == 0, "pthread_setspecific");
    for (int i = 0; i < 64; i++) {
        size_t n = 16 + (size_t)i * 97;
        unsigned char *b = blocks[i];
        for (size_t j = 0; j < n; j++)
            check(b[j] == ((tag + i) & 0xff), "contents");
        free(b);
    }
    return NULL;
}

int main(void) {
    for (int i = 0; i < NKEYS; i++)
        check(pthread_key_create(&keys[i], NULL) == 0, "pthread_key_create");
    work((void *)1);
    pthread_t t[NTHREADS];
    for (int i = 0; i < NTHREADS; i++)
        check(pthread_create(&t[i], NULL, work, (void *)(size_t)(i + 2)) == 0, "pthread_create");
    for (int i = 0; i < NTHREADS; i++)
        pthread_join(t[i], NULL);
    printf("keys: ok\n");
    return 0;
}
