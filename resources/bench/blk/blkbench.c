/*
 * blkbench: the guest side of Kiln's virtio-blk benchmark (resources/bench/blk/run).
 *
 * Measures, on a block device opened with O_DIRECT (so the guest's page cache is out of the
 * picture and every request reaches the virtual disk), one request at a time (queue depth 1):
 *
 *   1. sequential write: SEQ_MIB MiB in 1 MiB requests from offset 0, then fsync (a virtio-blk
 *      flush), timed together (on a fresh qcow2 overlay: every cluster is allocated here);
 *   2. the same again (now in place: "allocated");
 *   3. sequential read of the same range in 1 MiB requests;
 *   4. 4 KiB random reads at 4 KiB-aligned offsets inside that range, from a PRNG seeded with
 *      SEED (xorshift64*), for RAND_SECS seconds;
 *   5. 4 KiB random writes inside that range for RAND_SECS seconds, then fsync;
 *   6. 4 KiB random writes in the next SEQ_MIB MiB, never written before (on a fresh overlay:
 *      each one allocates a cluster and copies the rest of it from the base), for RAND_SECS
 *      seconds, then fsync.
 *
 * Every 4 KiB block written carries a stamp (magic, its own offset, SEED), and every read
 * checks it: a disk that returns wrong data (or nothing) makes the run fail instead of looking
 * fast.
 *
 * Output, one line per figure (MB = 10^6 bytes):
 *   KILN-BLK name=seq_write value=123.45 unit=MB/s bytes=67108864 ns=543210000
 *   KILN-BLK name=seq_rewrite value=... unit=MB/s bytes=... ns=...
 *   KILN-BLK name=seq_read value=... unit=MB/s bytes=... ns=...
 *   KILN-BLK name=rand_read_4k value=... unit=IOPS ops=... ns=...
 *   KILN-BLK name=rand_write_4k value=... unit=IOPS ops=... ns=...
 *   KILN-BLK name=rand_write_4k_fresh value=... unit=IOPS ops=... ns=...
 *   KILN-BLK done
 * Errors: one `KILN-BLK error ...` line on stdout, exit status 1. Usage errors: exit status 2.
 *
 * usage: blkbench DEVICE SEQ_MIB RAND_SECS SEED
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define MIB (1024u * 1024u)
#define BLOCK 4096u
#define STAMP_MAGIC UINT64_C(0x4b494c4e424c4b31) /* "KILNBLK1" */

struct stamp {
    uint64_t magic;
    uint64_t offset;
    uint64_t seed;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* xorshift64* (Vigna): small, fast, good enough to scatter offsets. */
static uint64_t next_random(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * UINT64_C(0x2545F4914F6CDD1D);
}

static int fail(const char *what, uint64_t offset, int err)
{
    printf("KILN-BLK error %s at offset %" PRIu64 ": %s\n", what, offset,
           err ? strerror(err) : "short transfer");
    fflush(stdout);
    return 1;
}

static int check_stamp(const unsigned char *block, uint64_t offset, uint64_t seed)
{
    struct stamp got;
    memcpy(&got, block, sizeof(got));
    if (got.magic == STAMP_MAGIC && got.offset == offset && got.seed == seed)
        return 0;
    printf("KILN-BLK error data check at offset %" PRIu64 ": found magic %#" PRIx64
           " offset %" PRIu64 " seed %" PRIu64 "\n",
           offset, got.magic, got.offset, got.seed);
    fflush(stdout);
    return 1;
}

/* Parses a whole unsigned decimal number in [min, max]; 0 on success. */
static int parse_number(const char *text, uint64_t min, uint64_t max, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-' || value < min || value > max)
        return -1;
    *out = value;
    return 0;
}

static void report_rate(const char *name, uint64_t bytes, uint64_t ns)
{
    printf("KILN-BLK name=%s value=%.2f unit=MB/s bytes=%" PRIu64 " ns=%" PRIu64 "\n", name,
           (double)bytes * 1e3 / (double)ns, bytes, ns);
    fflush(stdout);
}

/* SEQ bytes from offset 0 in 1 MiB requests, every 4 KiB block stamped, then fsync. */
static int sequential_write(int fd, unsigned char *buffer, uint64_t bytes, uint64_t seed,
                            const char *name)
{
    uint64_t start = now_ns();
    for (uint64_t offset = 0; offset < bytes; offset += MIB) {
        for (uint64_t block = 0; block < MIB; block += BLOCK) {
            struct stamp stamp = {STAMP_MAGIC, offset + block, seed};
            memcpy(buffer + block, &stamp, sizeof(stamp));
        }
        ssize_t done = pwrite(fd, buffer, MIB, (off_t)offset);
        if (done != (ssize_t)MIB)
            return fail("write", offset, done < 0 ? errno : 0);
    }
    if (fsync(fd) != 0)
        return fail("fsync", 0, errno);
    report_rate(name, bytes, now_ns() - start);
    return 0;
}

/* 4 KiB stamped writes at random blocks of [base, base + bytes) for SECS seconds, then fsync. */
static int random_write(int fd, unsigned char *buffer, uint64_t base, uint64_t bytes,
                        uint64_t secs, uint64_t seed, const char *name)
{
    uint64_t blocks = bytes / BLOCK;
    uint64_t state = seed ^ base ^ UINT64_C(0x5752495445);
    uint64_t ops = 0;
    uint64_t limit = secs * 1000000000u;
    uint64_t elapsed = 0;
    uint64_t start = now_ns();
    while (elapsed < limit) {
        uint64_t offset = base + (next_random(&state) % blocks) * BLOCK;
        struct stamp stamp = {STAMP_MAGIC, offset, seed};
        memcpy(buffer, &stamp, sizeof(stamp));
        ssize_t done = pwrite(fd, buffer, BLOCK, (off_t)offset);
        if (done != (ssize_t)BLOCK)
            return fail("random write", offset, done < 0 ? errno : 0);
        ops++;
        elapsed = now_ns() - start;
    }
    if (fsync(fd) != 0)
        return fail("fsync", 0, errno);
    elapsed = now_ns() - start;
    printf("KILN-BLK name=%s value=%.1f unit=IOPS ops=%" PRIu64 " ns=%" PRIu64 "\n", name,
           (double)ops * 1e9 / (double)elapsed, ops, elapsed);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t seq_mib, rand_secs, seed;
    if (argc != 5 || parse_number(argv[2], 1, 1u << 20, &seq_mib) ||
        parse_number(argv[3], 1, 3600, &rand_secs) ||
        parse_number(argv[4], 1, UINT64_MAX, &seed)) {
        fprintf(stderr, "usage: blkbench DEVICE SEQ_MIB(1..) RAND_SECS(1..3600) SEED(1..)\n");
        return 2;
    }
    const char *device = argv[1];
    uint64_t bytes = seq_mib * MIB;

    int fd = open(device, O_RDWR | O_DIRECT);
    if (fd < 0)
        return fail("open", 0, errno);
    uint64_t device_bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &device_bytes) != 0)
        return fail("BLKGETSIZE64", 0, errno);
    if (device_bytes < bytes) {
        printf("KILN-BLK error %s has %" PRIu64 " bytes, fewer than the %" PRIu64
               " to write\n",
               device, device_bytes, bytes);
        return 1;
    }

    unsigned char *buffer;
    if (posix_memalign((void **)&buffer, BLOCK, MIB) != 0)
        return fail("posix_memalign", 0, ENOMEM);
    /* Not zeros (a host could special-case those), and touched before the clock starts. */
    uint64_t fill = seed;
    for (size_t i = 0; i < MIB; i += sizeof(uint64_t)) {
        uint64_t word = next_random(&fill);
        memcpy(buffer + i, &word, sizeof(word));
    }

    /* 1. Sequential write + fsync; 2. again, over what is now written. */
    if (sequential_write(fd, buffer, bytes, seed, "seq_write") ||
        sequential_write(fd, buffer, bytes, seed, "seq_rewrite"))
        return 1;

    /* 3. Sequential read, every block checked (the check is a few ns per 4 KiB). */
    memset(buffer, 0, MIB);
    uint64_t start = now_ns();
    for (uint64_t offset = 0; offset < bytes; offset += MIB) {
        ssize_t done = pread(fd, buffer, MIB, (off_t)offset);
        if (done != (ssize_t)MIB)
            return fail("read", offset, done < 0 ? errno : 0);
        for (uint64_t block = 0; block < MIB; block += BLOCK)
            if (check_stamp(buffer + block, offset + block, seed))
                return 1;
    }
    report_rate("seq_read", bytes, now_ns() - start);

    /* 4. 4 KiB random reads at queue depth 1 for RAND_SECS. */
    uint64_t blocks = bytes / BLOCK;
    uint64_t state = seed;
    uint64_t ops = 0;
    uint64_t limit = rand_secs * 1000000000u;
    uint64_t elapsed = 0;
    start = now_ns();
    while (elapsed < limit) {
        uint64_t offset = (next_random(&state) % blocks) * BLOCK;
        ssize_t done = pread(fd, buffer, BLOCK, (off_t)offset);
        if (done != (ssize_t)BLOCK)
            return fail("random read", offset, done < 0 ? errno : 0);
        if (check_stamp(buffer, offset, seed))
            return 1;
        ops++;
        elapsed = now_ns() - start;
    }
    printf("KILN-BLK name=rand_read_4k value=%.1f unit=IOPS ops=%" PRIu64 " ns=%" PRIu64 "\n",
           (double)ops * 1e9 / (double)elapsed, ops, elapsed);
    fflush(stdout);

    /* 5. 4 KiB random writes over written blocks; 6. over blocks never written. */
    if (random_write(fd, buffer, 0, bytes, rand_secs, seed, "rand_write_4k"))
        return 1;
    if (device_bytes >= 2 * bytes &&
        random_write(fd, buffer, bytes, bytes, rand_secs, seed, "rand_write_4k_fresh"))
        return 1;
    printf("KILN-BLK done\n");
    fflush(stdout);
    close(fd);
    free(buffer);
    return 0;
}
