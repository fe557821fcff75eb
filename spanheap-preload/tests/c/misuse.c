/* Misuses the preload must catch (abort with a one-line report), as glibc does:
 * misuse interior-free | interior-realloc | double-free | free-freed-huge.
 * Prints "misuse: not caught" and exits 0 if the misuse went unnoticed. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Through a volatile pointer: the compiler may not drop an allocation it sees unused. */
static void *volatile sink;

static void *double_free(void *arg) {
    (void)arg;
    sink = malloc(64);
    free(sink);
    free(sink);
    /* The thread's exit returns its free stack to the spans: caught there. */
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *m = argv[1];
    if (!strcmp(m, "interior-free")) {
        char *p = malloc(100);
        free(p + 16);
    } else if (!strcmp(m, "interior-free-large")) {
        char *p = malloc(200000);
        free(p + 8192);
    } else if (!strcmp(m, "interior-realloc")) {
        char *p = malloc(100);
        p = realloc(p + 8, 1000);
    } else if (!strcmp(m, "double-free")) {
        pthread_t t;
        pthread_create(&t, NULL, double_free, NULL);
        pthread_join(t, NULL);
    } else if (!strcmp(m, "free-freed-huge")) {
        /* The first large free starts the background scavenger, whose start-up
         * allocates (glibc's pthread_create) and may reuse freed pages: let that
         * happen before the block under test is freed. */
        sink = malloc(40 << 20);
        free(sink);
        sink = malloc(40 << 20);
        free(sink);
        free(sink);
    } else {
        return 2;
    }
    printf("misuse: not caught\n");
    return 0;
}
