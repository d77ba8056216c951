/*
 * kiln-vsock: a tiny stream helper for Kiln's vsock tests, built static so that it runs in the
 * busybox guest and in the virtual KVM host alike.
 *
 *   kiln-vsock listen PORT [COUNT]      guest: accept COUNT (default 1) AF_VSOCK connections on
 *                                       PORT, echo each until EOF (one process per connection);
 *                                       prints "LISTENING PORT" once bound and
 *                                       "CONN-DONE bytes=N end=eof|<error>" per connection
 *   kiln-vsock connect CID PORT         guest: connect to CID:PORT, stdin to the socket (then
 *                                       shutdown(SHUT_WR)), the socket to stdout until EOF
 *   kiln-vsock uds-connect PATH PORT    host: Firecracker's handshake on the Unix socket PATH
 *                                       (CONNECT PORT / OK N), then like connect
 *   kiln-vsock uds-listen PATH [COUNT]  host: listen on the Unix socket PATH, echo COUNT
 *                                       connections like listen
 *   kiln-vsock rtt MODE... ROUNDS SIZE  benchmark client (MODE: vsock CID PORT | uds PATH PORT):
 *                                       ROUNDS echo round trips of SIZE bytes, prints
 *                                       "RTT-US median=N p99=N"
 *   kiln-vsock push MODE... BYTES       benchmark client: sends BYTES, waits for the echo,
 *                                       prints "THROUGHPUT-MIBS N"
 *
 * Connection failures print "connect failed after N ms: <error>" on stderr and exit 2; a Unix
 * socket closed without an OK line prints "no OK after N ms" and exits 3.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BUF_SIZE (64 * 1024)

static long long now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void die(const char *what)
{
    fprintf(stderr, "kiln-vsock: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void set_nonblocking(int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        die("fcntl");
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Echoes one connection until EOF; returns bytes echoed, or -errno. */
static long long echo(int fd)
{
    static char buf[BUF_SIZE];
    long long total = 0;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (write_all(fd, buf, (size_t)n) < 0)
            return -errno;
        total += n;
    }
    shutdown(fd, SHUT_WR);
    return total;
}

/* Accepts `count` connections, one child each; waits for all of them. */
static int serve(int listener, long count)
{
    for (long i = 0; i < count; i++) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR) {
                i--;
                continue;
            }
            die("accept");
        }
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            close(listener);
            long long result = echo(fd);
            if (result >= 0)
                printf("CONN-DONE bytes=%lld end=eof\n", result);
            else
                printf("CONN-DONE bytes=? end=%s\n", strerror((int)-result));
            fflush(stdout);
            close(fd);
            _exit(0);
        }
        close(fd);
    }
    close(listener);
    while (wait(NULL) > 0 || errno == EINTR)
        ;
    return 0;
}

/* stdin to the socket (then SHUT_WR), the socket to stdout, until the socket's EOF. */
static int relay(int fd)
{
    static char in[BUF_SIZE], out[BUF_SIZE];
    size_t pending = 0, offset = 0;
    int stdin_open = 1;
    set_nonblocking(fd);
    for (;;) {
        struct pollfd fds[2] = {
            {.fd = fd, .events = POLLIN | (pending ? POLLOUT : 0)},
            {.fd = stdin_open && !pending ? 0 : -1, .events = POLLIN},
        };
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (fds[1].revents) {
            ssize_t n = read(0, in, sizeof in);
            if (n > 0) {
                pending = (size_t)n;
                offset = 0;
            } else if (n == 0 || errno != EINTR) {
                stdin_open = 0;
                shutdown(fd, SHUT_WR);
            }
        }
        if (pending && (fds[0].revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t n = write(fd, in + offset, pending);
            if (n > 0) {
                offset += (size_t)n;
                pending -= (size_t)n;
                if (!pending && !stdin_open)
                    shutdown(fd, SHUT_WR);
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                fprintf(stderr, "kiln-vsock: write: %s\n", strerror(errno));
                return 4;
            }
        }
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(fd, out, sizeof out);
            if (n == 0)
                return 0;
            if (n > 0) {
                if (write_all(1, out, (size_t)n) < 0)
                    die("write stdout");
            } else if (errno != EAGAIN && errno != EINTR) {
                fprintf(stderr, "kiln-vsock: read: %s\n", strerror(errno));
                return 4;
            }
        }
    }
}

static int vsock_connect(unsigned cid, unsigned port)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket(AF_VSOCK)");
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    long long start = now_us();
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        fprintf(stderr, "connect failed after %lld ms: %s\n", (now_us() - start) / 1000,
                strerror(errno));
        exit(2);
    }
    return fd;
}

static int unix_socket(const char *path, struct sockaddr_un *addr)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket(AF_UNIX)");
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr->sun_path) {
        fprintf(stderr, "kiln-vsock: path too long: %s\n", path);
        exit(1);
    }
    strcpy(addr->sun_path, path);
    return fd;
}

/* Firecracker's handshake: CONNECT PORT, then one line back that must start with OK. */
static int uds_connect(const char *path, unsigned port)
{
    struct sockaddr_un addr;
    int fd = unix_socket(path, &addr);
    long long start = now_us();
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        fprintf(stderr, "connect failed after %lld ms: %s\n", (now_us() - start) / 1000,
                strerror(errno));
        exit(2);
    }
    char line[64];
    int len = snprintf(line, sizeof line, "CONNECT %u\n", port);
    if (write_all(fd, line, (size_t)len) < 0)
        die("write CONNECT");
    size_t got = 0;
    while (got < sizeof line - 1) {
        ssize_t n = read(fd, line + got, 1);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            fprintf(stderr, "no OK after %lld ms: %s\n", (now_us() - start) / 1000,
                    n == 0 ? "the socket was closed" : strerror(errno));
            exit(3);
        }
        if (line[got++] == '\n')
            break;
    }
    line[got] = 0;
    if (strncmp(line, "OK ", 3) != 0) {
        fprintf(stderr, "unexpected answer: %s", line);
        exit(3);
    }
    fprintf(stderr, "%s", line);
    return fd;
}

static int open_mode(char **argv, int *used)
{
    if (strcmp(argv[0], "vsock") == 0 && argv[1] && argv[2]) {
        *used = 3;
        return vsock_connect((unsigned)strtoul(argv[1], NULL, 10),
                             (unsigned)strtoul(argv[2], NULL, 10));
    }
    if (strcmp(argv[0], "uds") == 0 && argv[1] && argv[2]) {
        *used = 3;
        return uds_connect(argv[1], (unsigned)strtoul(argv[2], NULL, 10));
    }
    fprintf(stderr, "kiln-vsock: expected vsock CID PORT or uds PATH PORT\n");
    exit(1);
}

static int cmp_ll(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

static int read_exact(int fd, char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = read(fd, buf, len);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int rtt(int fd, long rounds, long size)
{
    char *buf = calloc(1, (size_t)size);
    long long *samples = calloc((size_t)rounds, sizeof *samples);
    if (!buf || !samples)
        die("calloc");
    for (long i = 0; i < rounds; i++) {
        long long start = now_us();
        if (write_all(fd, buf, (size_t)size) < 0 || read_exact(fd, buf, (size_t)size) < 0)
            die("round trip");
        samples[i] = now_us() - start;
    }
    qsort(samples, (size_t)rounds, sizeof *samples, cmp_ll);
    printf("RTT-US median=%lld p99=%lld\n", samples[rounds / 2], samples[rounds * 99 / 100]);
    return 0;
}

static int push(int fd, long long bytes)
{
    static char buf[BUF_SIZE];
    long long sent = 0, received = 0, start = now_us();
    set_nonblocking(fd);
    while (received < bytes) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN | (sent < bytes ? POLLOUT : 0)};
        if (poll(&pfd, 1, -1) < 0 && errno != EINTR)
            die("poll");
        if (sent < bytes && (pfd.revents & POLLOUT)) {
            size_t chunk = bytes - sent < BUF_SIZE ? (size_t)(bytes - sent) : BUF_SIZE;
            ssize_t n = write(fd, buf, chunk);
            if (n > 0)
                sent += n;
            if (sent == bytes)
                shutdown(fd, SHUT_WR);
        }
        if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(fd, buf, sizeof buf);
            if (n == 0)
                break;
            if (n > 0)
                received += n;
            else if (errno != EAGAIN && errno != EINTR)
                die("read");
        }
    }
    double seconds = (double)(now_us() - start) / 1e6;
    /* Both directions moved `bytes`. */
    printf("THROUGHPUT-MIBS %.1f\n", (double)bytes / seconds / (1024 * 1024));
    return received == bytes ? 0 : 5;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && strcmp(argv[1], "listen") == 0) {
        int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            die("socket(AF_VSOCK)");
        struct sockaddr_vm addr = {
            .svm_family = AF_VSOCK,
            .svm_cid = VMADDR_CID_ANY,
            .svm_port = (unsigned)strtoul(argv[2], NULL, 10),
        };
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 64) < 0)
            die("bind/listen");
        printf("LISTENING %s\n", argv[2]);
        return serve(fd, argc >= 4 ? strtol(argv[3], NULL, 10) : 1);
    }
    if (argc >= 3 && strcmp(argv[1], "uds-listen") == 0) {
        struct sockaddr_un addr;
        int fd = unix_socket(argv[2], &addr);
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 64) < 0)
            die("bind/listen");
        printf("LISTENING %s\n", argv[2]);
        return serve(fd, argc >= 4 ? strtol(argv[3], NULL, 10) : 1);
    }
    if (argc == 4 && strcmp(argv[1], "connect") == 0)
        return relay(vsock_connect((unsigned)strtoul(argv[2], NULL, 10),
                                   (unsigned)strtoul(argv[3], NULL, 10)));
    if (argc == 4 && strcmp(argv[1], "uds-connect") == 0)
        return relay(uds_connect(argv[2], (unsigned)strtoul(argv[3], NULL, 10)));
    if (argc >= 6 && strcmp(argv[1], "rtt") == 0) {
        int used = 0;
        int fd = open_mode(argv + 2, &used);
        if (argc < 2 + used + 2)
            return 1;
        return rtt(fd, strtol(argv[2 + used], NULL, 10), strtol(argv[3 + used], NULL, 10));
    }
    if (argc >= 5 && strcmp(argv[1], "push") == 0) {
        int used = 0;
        int fd = open_mode(argv + 2, &used);
        if (argc < 2 + used + 1)
            return 1;
        return push(fd, strtoll(argv[2 + used], NULL, 10));
    }
    fprintf(stderr, "usage: see the comment at the top of kiln-vsock.c\n");
    return 1;
}
