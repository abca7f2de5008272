// A kernel byte relay between two connected TCP sockets: splice(2) through a pipe per direction, so
// the bytes never enter user space. One epoll thread serves every pair of the process. Node's event
// loop hands a pair over, reads its live byte counts, and hears when a direction's FIN was passed on
// and when the pair ended.
//
// The thread works on dup()s of Node's descriptors: Node may close its own at any time (its socket was
// destroyed) without the thread ever touching a reused descriptor number. A pair's end is reported
// after the thread has closed its dups, so that Node's close is the socket's last reference (a
// resetAndDestroy() then really sends the RST).
//
// Half-close: a direction ends when its source reads EOF and its pipe is empty; then the thread
// shuts the destination down for writing (its FIN follows every byte). A reset or error on either
// socket ends the pair at once, naming the side; Node resets the other.
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#include <node_api.h>

#define PIPE_BYTES (1 << 20)

struct dir {
  int src, dst;
  int pipe_r, pipe_w;
  size_t in_pipe, cap;
  uint64_t *moved;     // bytes read from src, in the caller's buffer: JS reads it while the pair runs
  bool eof, done;
};

struct pair;
struct end { struct pair *p; int side; };  // what an epoll event points to: a pair's socket

struct pair {
  uint32_t id;
  int fd[2];           // dups: [0] = a, [1] = b
  struct end ends[2];
  struct dir d[2];     // [0] = a -> b, [1] = b -> a
  uint32_t events[2];  // what epoll watches on each: EPOLLOUT only while bytes wait for that socket
  int failed_side;     // -1, or 0/1: the socket whose error ended the pair
  int err;             // its errno
  bool aborted, finished;
  struct pair *next;   // in `pairs`, then in `ended` until the epoll batch that saw it is done
};

// Messages from the thread to JS (a direction ended: its FIN was passed on; or the pair ended), and
// requests from JS to the thread.
struct result { uint32_t id; int ended_dir; int failed_side, err; bool aborted; };
struct request { enum { ADD, ABORT } kind; uint32_t id; struct pair *p; struct request *next; };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct request *requests;  // under lock
static int epfd = -1, wake = -1;
static napi_threadsafe_function tsfn;
static struct pair *pairs;        // the thread's own list
static struct pair *ended;        // finished pairs, freed after the current epoll batch
static uint32_t next_id = 1;
static uint32_t active;           // pairs JS has not heard the end of (JS thread only)

static void post(struct request *r) {
  pthread_mutex_lock(&lock);
  r->next = requests;
  requests = r;
  pthread_mutex_unlock(&lock);
  uint64_t one = 1;
  (void)!write(wake, &one, sizeof one);
}

// Moves what it can in one direction, without blocking. Returns the errno that ends the pair (and
// sets *side to the socket it came from), or 0.
static int pump(struct dir *d, int *side, int src_side) {
  for (;;) {
    bool progress = false;
    if (!d->eof && d->in_pipe < d->cap) {
      ssize_t n = splice(d->src, NULL, d->pipe_w, NULL, d->cap - d->in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      // Counted as read, like the event-loop relay: the count never trails what the far end got. (A
      // splice into the destination may first run the receive softirqs of what it sent, for
      // milliseconds, during which the far end may already have acknowledged it.)
      if (n > 0) { d->in_pipe += (size_t)n; __atomic_store_n(d->moved, *d->moved + (uint64_t)n, __ATOMIC_RELAXED); progress = true; }
      else if (n == 0) { d->eof = true; progress = true; }
      else if (errno != EAGAIN && errno != EINTR) { *side = src_side; return errno; }
    }
    if (d->in_pipe > 0) {
      ssize_t n = splice(d->pipe_r, NULL, d->dst, NULL, d->in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n > 0) { d->in_pipe -= (size_t)n; progress = true; }
      else if (n < 0 && errno != EAGAIN && errno != EINTR) { *side = 1 - src_side; return errno; }
    }
    if (d->eof && d->in_pipe == 0 && !d->done) {
      d->done = true;
      if (shutdown(d->dst, SHUT_WR) < 0 && errno != ENOTCONN) { *side = 1 - src_side; return errno; }
    }
    if (!progress) return 0;
  }
}

static void tell(struct result r) {
  struct result *m = malloc(sizeof *m);
  if (!m) return;
  *m = r;
  napi_call_threadsafe_function(tsfn, m, napi_tsfn_blocking);
}

static void finish(struct pair *p) {
  for (struct pair **pp = &pairs; *pp; pp = &(*pp)->next) if (*pp == p) { *pp = p->next; break; }
  for (int i = 0; i < 2; i++) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, p->fd[i], NULL);
    close(p->fd[i]);
    close(p->d[i].pipe_r);
    close(p->d[i].pipe_w);
  }
  tell((struct result){ p->id, -1, p->failed_side, p->err, p->aborted });
  // Later events of this epoll batch may still point here: freed once the batch is done.
  p->finished = true;
  p->next = ended;
  ended = p;
}

static void run(struct pair *p, int hup_side) {
  bool was_done[2] = { p->d[0].done, p->d[1].done };
  // A reset on a socket whose direction toward it is idle shows only as an error on the socket.
  if (hup_side >= 0) {
    int e = 0;
    socklen_t len = sizeof e;
    if (getsockopt(p->fd[hup_side], SOL_SOCKET, SO_ERROR, &e, &len) == 0 && e) {
      p->failed_side = hup_side; p->err = e; finish(p); return;
    }
  }
  for (int i = 0; i < 2; i++) {
    int side = -1, err = pump(&p->d[i], &side, i);
    if (err) { p->failed_side = side; p->err = err; finish(p); return; }
    if (p->d[i].done && !was_done[i]) tell((struct result){ p->id, i, -1, 0, false });
  }
  if (p->d[0].done && p->d[1].done) { finish(p); return; }
  // Every ACK that frees send space would wake the thread: ask for EPOLLOUT only while a pipe holds
  // bytes for that socket. Re-arming (MOD) reports a socket that is already writable at once.
  for (int i = 0; i < 2; i++) {
    uint32_t want = EPOLLIN | EPOLLRDHUP | EPOLLET | (p->d[1 - i].in_pipe ? EPOLLOUT : 0);
    if (want == p->events[i]) continue;
    struct epoll_event ev = { .events = want, .data.ptr = &p->ends[i] };
    epoll_ctl(epfd, EPOLL_CTL_MOD, p->fd[i], &ev);
    p->events[i] = want;
  }
}

static void take_requests(void) {
  pthread_mutex_lock(&lock);
  struct request *r = requests;
  requests = NULL;
  pthread_mutex_unlock(&lock);
  // The list is newest first: reverse it so that an ADD is handled before an ABORT of the same pair.
  struct request *ordered = NULL;
  while (r) { struct request *n = r->next; r->next = ordered; ordered = r; r = n; }
  for (r = ordered; r; ) {
    struct request *n = r->next;
    if (r->kind == ADD) {
      struct pair *p = r->p;
      p->next = pairs;
      pairs = p;
      for (int i = 0; i < 2; i++) {
        p->events[i] = EPOLLIN | EPOLLRDHUP | EPOLLET;
        p->ends[i] = (struct end){ p, i };
        struct epoll_event ev = { .events = p->events[i], .data.ptr = &p->ends[i] };
        epoll_ctl(epfd, EPOLL_CTL_ADD, p->fd[i], &ev);
      }
      run(p, -1); // bytes that arrived before the handover wait in the socket: move them now
    } else {
      for (struct pair *p = pairs; p; p = p->next)
        if (p->id == r->id) {
          // Aborted means reset: with linger 0, whichever close is the socket's last sends a RST,
          // even where Node has already closed its own descriptor (its socket was destroyed).
          struct linger lg = { 1, 0 };
          for (int i = 0; i < 2; i++) setsockopt(p->fd[i], SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
          p->aborted = true;
          finish(p);
          break;
        }
    }
    free(r);
    r = n;
  }
}

static void *loop(void *arg) {
  struct epoll_event evs[64];
  for (;;) {
    int n = epoll_wait(epfd, evs, 64, -1);
    for (int i = 0; i < n; i++) {
      struct end *e = evs[i].data.ptr;
      if (!e) {
        uint64_t v;
        (void)!read(wake, &v, sizeof v);
        take_requests();
      } else if (!e->p->finished) {
        run(e->p, evs[i].events & (EPOLLERR | EPOLLHUP) ? e->side : -1);
      }
    }
    while (ended) { struct pair *p = ended; ended = p->next; free(p); }
  }
  return NULL;
}

static void call_js(napi_env env, napi_value cb, void *ctx, void *data) {
  struct result *r = data;
  if (env && cb) {
    napi_value argv[5], undef;
    napi_create_uint32(env, r->id, &argv[0]);
    napi_create_int32(env, r->ended_dir, &argv[1]);
    napi_create_int32(env, r->failed_side, &argv[2]);
    napi_create_int32(env, r->err, &argv[3]);
    napi_get_boolean(env, r->aborted, &argv[4]);
    napi_get_undefined(env, &undef);
    if (r->ended_dir < 0 && --active == 0) napi_unref_threadsafe_function(env, tsfn);
    napi_call_function(env, undef, cb, 5, argv, NULL);
  }
  free(r);
}

static napi_value throw_errno(napi_env env, const char *what, int err) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
  napi_throw_error(env, "TCP_STITCH_SPLICE", msg);
  return NULL;
}

// init(onEvent): starts the thread. onEvent(id, endedDir, failedSide, errno, aborted): endedDir 0 (a->b)
// or 1 (b->a) when that direction's FIN was passed on; -1 when the pair ended (failedSide -1: cleanly).
static napi_value Init(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], name;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (epfd >= 0) return NULL;
  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (epfd < 0) return throw_errno(env, "epoll_create1", errno);
  wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) return throw_errno(env, "eventfd", errno);
  struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
  epoll_ctl(epfd, EPOLL_CTL_ADD, wake, &ev);
  napi_create_string_utf8(env, "tcp-stitch splice", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[0], NULL, name, 0, 1, NULL, NULL, NULL, call_js, &tsfn) != napi_ok)
    return throw_errno(env, "napi_create_threadsafe_function", EINVAL);
  napi_unref_threadsafe_function(env, tsfn);
  pthread_t t;
  int e = pthread_create(&t, NULL, loop, NULL);
  if (e) return throw_errno(env, "pthread_create", e);
  pthread_detach(t);
  return NULL;
}

static int open_dir(struct dir *d, int src, int dst) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0) return errno;
  d->src = src; d->dst = dst; d->pipe_r = fds[0]; d->pipe_w = fds[1];
  int cap = fcntl(fds[1], F_SETPIPE_SZ, PIPE_BYTES);
  if (cap < 0) cap = fcntl(fds[1], F_GETPIPE_SZ);
  d->cap = cap > 0 ? (size_t)cap : 65536;
  return 0;
}

// start(fdA, fdB, counters) -> id. The caller has stopped Node reading both and flushed its writes.
// counters: a BigUint64Array(2), bytes moved a->b and b->a, kept alive by the caller until the end.
static napi_value Start(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], out;
  int32_t fa, fb;
  napi_typedarray_type type;
  size_t len;
  void *counters = NULL;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (epfd < 0) { napi_throw_error(env, "TCP_STITCH_SPLICE", "init() was not called"); return NULL; }
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fa) != napi_ok || napi_get_value_int32(env, argv[1], &fb) != napi_ok || fa < 0 || fb < 0
      || napi_get_typedarray_info(env, argv[2], &type, &len, &counters, NULL, NULL) != napi_ok || type != napi_biguint64_array || len != 2) {
    napi_throw_type_error(env, "TCP_STITCH_SPLICE", "start(fdA, fdB, counters) takes two descriptors and a BigUint64Array(2)");
    return NULL;
  }
  struct pair *p = calloc(1, sizeof *p);
  struct request *r = calloc(1, sizeof *r);
  if (!p || !r) { free(p); free(r); return throw_errno(env, "start", ENOMEM); }
  p->fd[0] = p->fd[1] = -1;
  p->d[0].pipe_r = p->d[0].pipe_w = p->d[1].pipe_r = p->d[1].pipe_w = -1;
  p->failed_side = -1;
  int err = 0;
  if ((p->fd[0] = fcntl(fa, F_DUPFD_CLOEXEC, 0)) < 0 || (p->fd[1] = fcntl(fb, F_DUPFD_CLOEXEC, 0)) < 0) err = errno;
  if (!err) err = open_dir(&p->d[0], p->fd[0], p->fd[1]);
  if (!err) err = open_dir(&p->d[1], p->fd[1], p->fd[0]);
  p->d[0].moved = (uint64_t *)counters;
  p->d[1].moved = (uint64_t *)counters + 1;
  if (err) {
    for (int i = 0; i < 2; i++) {
      if (p->fd[i] >= 0) close(p->fd[i]);
      if (p->d[i].pipe_r >= 0) { close(p->d[i].pipe_r); close(p->d[i].pipe_w); }
    }
    free(p); free(r);
    return throw_errno(env, "start", err);
  }
  uint32_t id = p->id = next_id++;
  if (active++ == 0) napi_ref_threadsafe_function(env, tsfn);
  r->kind = ADD; r->p = p;
  post(r); // from here the thread owns p, and may already have ended and freed it
  napi_create_uint32(env, id, &out);
  return out;
}

// abort(id): the pair ends as soon as the thread sees it; onEvent reports aborted = true. An id that
// has already ended is ignored.
static napi_value Abort(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  uint32_t id;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_value_uint32(env, argv[0], &id) != napi_ok) { napi_throw_type_error(env, "TCP_STITCH_SPLICE", "abort(id)"); return NULL; }
  struct request *r = calloc(1, sizeof *r);
  if (!r) return throw_errno(env, "abort", ENOMEM);
  r->kind = ABORT; r->id = id;
  post(r);
  return NULL;
}

// socketError(fd) -> the socket's pending error (SO_ERROR, which this clears), or 0.
static napi_value SocketError(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out;
  int32_t fd;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0) { napi_throw_type_error(env, "TCP_STITCH_SPLICE", "socketError(fd)"); return NULL; }
  int e = 0;
  socklen_t len = sizeof e;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len) < 0) e = errno;
  napi_create_int32(env, e, &out);
  return out;
}

// setBuffers(fd, bytes): SO_RCVBUF and SO_SNDBUF of a connected socket (the kernel doubles them
// for its bookkeeping and stops autotuning them), to bound what one connection holds in the kernel.
static napi_value SetBuffers(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd, bytes;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok || fd < 0 ||
      napi_get_value_int32(env, argv[1], &bytes) != napi_ok || bytes <= 0) {
    napi_throw_type_error(env, "TCP_STITCH_SPLICE", "setBuffers(fd, bytes)");
    return NULL;
  }
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes) < 0) return throw_errno(env, "setsockopt SO_RCVBUF", errno);
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) < 0) return throw_errno(env, "setsockopt SO_SNDBUF", errno);
  return NULL;
}

static napi_value Register(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
    { "init", NULL, Init, NULL, NULL, NULL, napi_default, NULL },
    { "start", NULL, Start, NULL, NULL, NULL, napi_default, NULL },
    { "abort", NULL, Abort, NULL, NULL, NULL, napi_default, NULL },
    { "socketError", NULL, SocketError, NULL, NULL, NULL, napi_default, NULL },
    { "setBuffers", NULL, SetBuffers, NULL, NULL, NULL, napi_default, NULL },
  };
  napi_define_properties(env, exports, 5, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Register)
