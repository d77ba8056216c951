/*
 * bootbench: runs one VMM process and times it, for Kiln's Linux boot benchmark
 * (resources/bench/boot/run; runs inside the virtual KVM host, so it is built static).
 *
 *   bootbench LIMIT_SECS MARKER CONSOLE STDERR -- COMMAND [ARGS...]
 *
 * Starts COMMAND with stdin on /dev/null, its stdout (the guest console) on a pipe that is
 * copied to the file CONSOLE, and its stderr in the file STDERR. Notes when a console line
 * starting with MARKER first arrives, kills the process (SIGKILL) after LIMIT_SECS, and reaps it
 * with wait4 for its CPU time and peak RSS. Prints one line on stdout:
 *
 *   exit=0 timed_out=0 wall_us=812345 marker_us=601234 cpu_us=123456 max_rss_kib=23456
 *
 * wall_us runs from just before fork() to the moment wait4() returned; marker_us is -1 when the
 * marker never came. exit is the exit status, or 128 + the signal that ended the process.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void die(const char *what)
{
    fprintf(stderr, "bootbench: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int open_output(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        die(path);
    return fd;
}

/* Writes all of buf to fd; a console file that cannot be written is fatal. */
static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t done = write(fd, buf, len);
        if (done < 0 && errno == EINTR)
            continue;
        if (done <= 0)
            die("write the console file");
        buf += done;
        len -= (size_t)done;
    }
}

int main(int argc, char **argv)
{
    if (argc < 7 || strcmp(argv[5], "--") != 0) {
        fprintf(stderr, "usage: bootbench LIMIT_SECS MARKER CONSOLE STDERR -- COMMAND [ARGS...]\n");
        return 2;
    }
    long limit_secs = strtol(argv[1], NULL, 10);
    const char *marker = argv[2];
    size_t marker_len = strlen(marker);
    if (limit_secs <= 0 || marker_len == 0 || marker_len > 200) {
        fprintf(stderr, "bootbench: bad limit or marker\n");
        return 2;
    }
    int console = open_output(argv[3]);
    int errors = open_output(argv[4]);
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0)
        die("pipe");

    long long start = now_us();
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        int null = open("/dev/null", O_RDONLY);
        if (null < 0 || dup2(null, 0) < 0 || dup2(pipe_fds[1], 1) < 0 || dup2(errors, 2) < 0)
            _exit(126);
        execvp(argv[6], &argv[6]);
        _exit(127);
    }
    close(pipe_fds[1]);

    long long deadline = start + limit_secs * 1000000LL;
    long long marker_at = -1;
    int timed_out = 0;
    /* The current console line, up to the marker's length (enough to recognise it). */
    char line[256];
    size_t line_len = 0;
    char buf[65536];
    for (;;) {
        long long left_ms = (deadline - now_us()) / 1000;
        if (left_ms <= 0) {
            timed_out = 1;
            kill(pid, SIGKILL);
            break;
        }
        struct pollfd pfd = { .fd = pipe_fds[0], .events = POLLIN };
        int ready = poll(&pfd, 1, (int)(left_ms > 1000 ? 1000 : left_ms));
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready < 0)
            die("poll");
        if (ready == 0)
            continue;
        ssize_t got = read(pipe_fds[0], buf, sizeof(buf));
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            die("read the console");
        if (got == 0)
            break; /* every writer closed: the VMM is exiting */
        long long got_at = now_us();
        write_all(console, buf, (size_t)got);
        for (ssize_t i = 0; i < got && marker_at < 0; i++) {
            char c = buf[i];
            if (c == '\n') {
                line_len = 0;
            } else if (c != '\r' && line_len < sizeof(line)) {
                line[line_len++] = c;
                if (line_len == marker_len && memcmp(line, marker, marker_len) == 0)
                    marker_at = got_at - start;
            }
        }
    }

    int status = 0;
    struct rusage usage;
    while (wait4(pid, &status, 0, &usage) < 0) {
        if (errno != EINTR)
            die("wait4");
    }
    long long wall = now_us() - start;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    long long cpu = (long long)(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) * 1000000 +
                    usage.ru_utime.tv_usec + usage.ru_stime.tv_usec;
    printf("exit=%d timed_out=%d wall_us=%lld marker_us=%lld cpu_us=%lld max_rss_kib=%ld\n",
           code, timed_out, wall, marker_at, cpu, usage.ru_maxrss);
    return 0;
}
