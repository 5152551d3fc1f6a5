/*
 * The QEMU comparison guest's /init (ferry-bench qemu): fills memory, then dirties it at a
 * fixed rate, like ferry's reference VM with one vCPU and the uniform pattern.
 *
 * Kernel command line: ferry_mem=MiB ferry_rate=MiB/s ferry_seed=N
 *
 * 1. mmaps ferry_mem MiB and fills every 8-byte word with xorshift64 output, which is never
 *    zero: zero-page detection can flatter neither QEMU nor ferry;
 * 2. prints FERRY-READY on the console;
 * 3. dirties ferry_rate MiB/s: one write of a random non-zero 8-byte value into a random
 *    word of a uniformly random page dirties that page, so ferry_rate * 256 writes per
 *    second. Pacing is in 1 ms slices against CLOCK_MONOTONIC; a guest that falls behind
 *    (TCG, a migration's dirty tracking) catches up at most 10 slices' worth, then drops
 *    the rest, so a pause is not followed by a burst;
 * 4. prints FERRY-RATE <MiB/s achieved> every second (0 when ferry_rate=0, where it only
 *    sleeps), which also shows that the guest runs after a migration.
 *
 * Build: gcc -O2 -static -o init dirty.c
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ull
#define SLICE_NS 1000000ll
#define CATCH_UP_SLICES 10

static uint64_t state;

static uint64_t xorshift64(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static void say(const char *line)
{
    /* The console is the benchmark's only channel: write(2), no stdio buffering. */
    ssize_t unused = write(1, line, strlen(line));
    (void)unused;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

/* The value of "key=" on the kernel command line, or fallback. */
static uint64_t cmdline_value(const char *cmdline, const char *key, uint64_t fallback)
{
    const char *p = strstr(cmdline, key);
    return p ? strtoull(p + strlen(key), NULL, 10) : fallback;
}

int main(void)
{
    mount("proc", "/proc", "proc", 0, NULL);
    char cmdline[4096] = "";
    FILE *f = fopen("/proc/cmdline", "r");
    if (f) {
        size_t n = fread(cmdline, 1, sizeof cmdline - 1, f);
        cmdline[n] = 0;
        fclose(f);
    }
    uint64_t mib = cmdline_value(cmdline, "ferry_mem=", 64);
    uint64_t rate = cmdline_value(cmdline, "ferry_rate=", 0);
    /* xorshift64 must not start at zero (it would stay there). */
    state = cmdline_value(cmdline, "ferry_seed=", 1) * 0x9e3779b97f4a7c15ull | 1;

    uint64_t bytes = mib << 20, pages = bytes / PAGE;
    uint64_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        say("FERRY-ERROR mmap failed\n");
        for (;;)
            pause();
    }
    for (uint64_t i = 0; i < bytes / 8; i++)
        mem[i] = xorshift64();
    say("FERRY-READY\n");

    char line[64];
    if (rate == 0) {
        for (;;) {
            sleep(1);
            say("FERRY-RATE 0.0\n");
        }
    }
    /* Writes per second: one per page dirtied, 256 pages per MiB. */
    const int64_t writes_per_s = (int64_t)rate * 256;
    int64_t start = now_ns(), last_print = start;
    int64_t done = 0, done_at_print = 0, dropped = 0;
    for (int64_t slice = 1;; slice++) {
        int64_t now = now_ns();
        /* Writes due by now since start, minus any dropped while falling behind. */
        int64_t due = (int64_t)((__int128)(now - start) * writes_per_s / 1000000000ll) - dropped;
        int64_t cap = writes_per_s * CATCH_UP_SLICES / 1000 + 1;
        if (due - done > cap) {
            dropped += due - done - cap;
            due = done + cap;
        }
        for (; done < due; done++) {
            uint64_t r = xorshift64();
            uint64_t page = r % pages, word = (r >> 40) % (PAGE / 8);
            mem[page * (PAGE / 8) + word] = xorshift64();
        }
        now = now_ns();
        if (now - last_print >= 1000000000ll) {
            double mib_s = (double)(done - done_at_print) / 256.0 * 1e9 / (double)(now - last_print);
            snprintf(line, sizeof line, "FERRY-RATE %.1f\n", mib_s);
            say(line);
            last_print = now;
            done_at_print = done;
        }
        /* Sleep until this slice ends (no sleep when already late). */
        int64_t wake = start + slice * SLICE_NS;
        if (wake > now) {
            struct timespec ts = {.tv_sec = 0, .tv_nsec = wake - now};
            nanosleep(&ts, NULL);
        } else {
            slice = (now - start) / SLICE_NS;
        }
    }
}
