/* A fixed loop of malloc/free pairs for instruction counting under LD_PRELOAD
 * (tools/callgrind-preload.sh). Usage: c-pair <size> <pairs> */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    size_t n = strtoul(argv[1], NULL, 10);
    long pairs = strtol(argv[2], NULL, 10);
    void *volatile sink;
    for (long i = 0; i < pairs; i++) {
        void *p = malloc(n);
        sink = p;
        free(p);
    }
    (void)sink;
    return 0;
}
