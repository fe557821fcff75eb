/* A C program for the heap profile under the preload: two call sites leak 3:1 bytes
 * (30,000 and 10,000 blocks of 1 KiB), a third churns (allocates and frees). Run with
 * SPANHEAP_PROF_RATE and SPANHEAP_PROF_FILE; the profile written at exit must name
 * leak_three and leak_one. */
#include <stdlib.h>
#include <string.h>

static void *keep[40000];

__attribute__((noinline)) void *leak_three(int i) {
    void *p = malloc(1024);
    memset(p, i, 1024);
    return p;
}

__attribute__((noinline)) void *leak_one(int i) {
    void *p = calloc(1, 1024);
    ((char *)p)[0] = (char)i;
    return p;
}

__attribute__((noinline)) void churn(int i) {
    char *p = malloc(100 + i % 900);
    p[0] = (char)i;
    p = realloc(p, 2000 + i % 3000);
    free(p);
}

int main(void) {
    int n = 0;
    for (int i = 0; i < 30000; i++) keep[n++] = leak_three(i);
    for (int i = 0; i < 10000; i++) keep[n++] = leak_one(i);
    for (int i = 0; i < 50000; i++) churn(i);
    return keep[n / 2] == NULL;
}
