// Round-trip latency over one TCP connection, in C: the same command line and output as
// test/fixtures/rtt.ts, without a JavaScript runtime's own pauses (1.5-3 ms every few ms there)
// in the figures. Built by the bench (bench/bed.ts).
//   rtt-probe server HOST PORT                       echoes every connection (a process each)
//   rtt-probe client HOST PORT N [--wait] [--timeline]
// The client prints {"event":"connected","port":P}, with --wait waits for a line on stdin, sends N
// one-byte pings one at a time, and prints {"event":"done","n","p50Us","p99Us"} and, with
// --timeline, "timeline": [[sent at (epoch ms), round trip (µs)], ...].
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

__attribute__((noreturn)) static void die(const char *what) {
  fprintf(stderr, "rtt-probe: %s: %s\n", what, strerror(errno));
  exit(1);
}

static struct sockaddr_in addr_of(const char *host, const char *port) {
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port))};
  if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
    fprintf(stderr, "rtt-probe: not an IPv4 address: %s\n", host);
    exit(2);
  }
  return a;
}

static void nodelay(int fd) {
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) die("TCP_NODELAY");
}

static void serve(int fd) {
  char buf[4096];
  nodelay(fd);
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;
    for (ssize_t off = 0; off < n;) {
      ssize_t w = write(fd, buf + off, (size_t)(n - off));
      if (w <= 0) _exit(0);
      off += w;
    }
  }
  _exit(0);
}

__attribute__((noreturn)) static void server(const char *host, const char *port) {
  struct sockaddr_in a = addr_of(host, port);
  int one = 1, ls = socket(AF_INET, SOCK_STREAM, 0);
  if (ls < 0) die("socket");
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
  if (listen(ls, 64) < 0) die("listen");
  signal(SIGCHLD, SIG_IGN); // children are reaped by the kernel
  printf("ready\n");
  fflush(stdout);
  for (;;) {
    int fd = accept(ls, NULL, NULL);
    if (fd < 0) {
      if (errno == EINTR) continue;
      die("accept");
    }
    pid_t pid = fork();
    if (pid == 0) {
      close(ls);
      serve(fd);
    }
    close(fd);
  }
}

static double now(clockid_t c) {
  struct timespec t;
  clock_gettime(c, &t);
  return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3; // µs
}

static int cmp(const void *x, const void *y) {
  double a = *(const double *)x, b = *(const double *)y;
  return (a > b) - (a < b);
}

static int client(const char *host, const char *port, long n, int wait_line, int timeline) {
  struct sockaddr_in a = addr_of(host, port), local;
  socklen_t len = sizeof local;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) die("socket");
  nodelay(fd);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
  if (getsockname(fd, (struct sockaddr *)&local, &len) < 0) die("getsockname");
  printf("{\"event\":\"connected\",\"port\":%d}\n", ntohs(local.sin_port));
  fflush(stdout);
  if (wait_line) {
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
  }
  double *rtt = malloc(sizeof(double) * (size_t)n), *sent = malloc(sizeof(double) * (size_t)n);
  if (!rtt || !sent) die("malloc");
  for (long i = 0; i < n; i++) {
    char c = 'x';
    sent[i] = now(CLOCK_REALTIME);
    double t0 = now(CLOCK_MONOTONIC);
    if (write(fd, &c, 1) != 1) die("write");
    if (read(fd, &c, 1) != 1) die("read (the connection ended)");
    rtt[i] = now(CLOCK_MONOTONIC) - t0;
  }
  shutdown(fd, SHUT_WR);
  double *sorted = malloc(sizeof(double) * (size_t)n);
  if (!sorted) die("malloc");
  memcpy(sorted, rtt, sizeof(double) * (size_t)n);
  qsort(sorted, (size_t)n, sizeof(double), cmp);
  long i50 = (long)(0.5 * n), i99 = (long)(0.99 * n);
  printf("{\"event\":\"done\",\"n\":%ld,\"p50Us\":%.0f,\"p99Us\":%.0f", n, sorted[i50 < n ? i50 : n - 1],
         sorted[i99 < n ? i99 : n - 1]);
  if (timeline) {
    printf(",\"timeline\":[");
    for (long i = 0; i < n; i++) printf("%s[%.3f,%.0f]", i ? "," : "", sent[i] / 1000, rtt[i]);
    printf("]");
  }
  printf("}\n");
  return 0;
}

int main(int argc, char **argv) {
  if (argc >= 4 && !strcmp(argv[1], "server")) server(argv[2], argv[3]);
  if (argc >= 5 && !strcmp(argv[1], "client")) {
    int wait_line = 0, timeline = 0;
    for (int i = 5; i < argc; i++) {
      if (!strcmp(argv[i], "--wait")) wait_line = 1;
      else if (!strcmp(argv[i], "--timeline")) timeline = 1;
      else {
        fprintf(stderr, "rtt-probe: unknown option %s\n", argv[i]);
        return 2;
      }
    }
    long n = atol(argv[4]);
    if (n <= 0) {
      fprintf(stderr, "rtt-probe: N must be a positive number of pings (got %s)\n", argv[4]);
      return 2;
    }
    return client(argv[2], argv[3], n, wait_line, timeline);
  }
  fprintf(stderr, "usage: rtt-probe server HOST PORT | rtt-probe client HOST PORT N [--wait] [--timeline]\n");
  return 2;
}
