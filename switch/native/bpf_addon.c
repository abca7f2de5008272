// tcp_stitch_bpf: a direct, synchronous path from Node to the switch's pinned eBPF maps and programs.
//
// Plain Node-API (node_api.h) over libbpf's low-level bpf.h wrappers. Every call is one or two
// bpf(2) syscalls on the JS thread; nothing is loaded or attached here. The one asynchronous piece
// is ringbufWatch: a ring buffer map's records, handed to a JS callback by the event loop.
//
// File descriptors are explicit: objGet() returns a new fd and the caller owns it until closeFd().
// Map key/value sizes are cached per fd (first use does one BPF_OBJ_GET_INFO_BY_FD) so that every
// buffer can be checked against the map before the kernel reads or writes it: a short buffer would
// otherwise be over-read (update) or overflowed (lookup). objGet() and closeFd() reset the cache
// entry for their fd, so close fds from this module with closeFd(), never with fs.closeSync().
//
// Errors are thrown as JS Errors with: code (errno name, e.g. "ENOENT"), errno (positive number),
// syscall (the libbpf call or "argument"), and for argument errors `argument` (its name).

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/bpf.h>
#include <node_api.h>
#include <uv.h>

#ifndef ENOTSUPP
#define ENOTSUPP 524 // kernel-internal "operation not supported", leaks out of bpf(2)
#endif

// ---------------------------------------------------------------------------------------------
// Errors

static const char *errno_name(int err) {
  switch (err) {
  case ENOTSUPP: return "ENOTSUPP";
  case 525: return "ETOOSMALL";
  default: break;
  }
  const char *n = strerrorname_np(err);
  return n ? n : "EUNKNOWN";
}

static const char *errno_message(int err) {
  if (err == ENOTSUPP) return "Operation not supported (by this map or program type)";
  return strerror(err);
}

// Throws Error(message) with code/errno/syscall (and argument, when not NULL). Returns NULL so
// callers can `return throw_error(...)`.
static napi_value throw_error(napi_env env, int err, const char *syscall, const char *argument,
                              const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static napi_value throw_error(napi_env env, int err, const char *syscall, const char *argument,
                              const char *fmt, ...) {
  char detail[384], msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof detail, fmt, ap);
  va_end(ap);
  if (argument)
    snprintf(msg, sizeof msg, "%s", detail);
  else
    snprintf(msg, sizeof msg, "%s: %s (%s)", detail, errno_message(err), errno_name(err));

  napi_value code, message, error, v;
  if (napi_create_string_utf8(env, errno_name(err), NAPI_AUTO_LENGTH, &code) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message) != napi_ok ||
      napi_create_error(env, code, message, &error) != napi_ok) {
    napi_throw_error(env, errno_name(err), msg);
    return NULL;
  }
  if (napi_create_int32(env, err, &v) == napi_ok) napi_set_named_property(env, error, "errno", v);
  if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &v) == napi_ok)
    napi_set_named_property(env, error, "syscall", v);
  if (argument && napi_create_string_utf8(env, argument, NAPI_AUTO_LENGTH, &v) == napi_ok)
    napi_set_named_property(env, error, "argument", v);
  napi_throw(env, error);
  return NULL;
}

#define THROW_ARG(env, op, arg, ...) throw_error(env, EINVAL, op, arg, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------
// Argument helpers. Each returns 0 on success or throws and returns -1.

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return -1;
  for (size_t i = argc; i < want; i++) napi_get_undefined(env, &argv[i]);
  return 0;
}

static int get_u32(napi_env env, napi_value v, const char *op, const char *name, uint32_t max,
                   uint32_t *out) {
  napi_valuetype t;
  double d;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number ||
      napi_get_value_double(env, v, &d) != napi_ok || d != d || d < 0 || d > max ||
      d != (double)(uint32_t)d) {
    THROW_ARG(env, op, name, "%s: %s must be an integer from 0 to %u", op, name, max);
    return -1;
  }
  *out = (uint32_t)d;
  return 0;
}

static int get_fd(napi_env env, napi_value v, const char *op, int *fd) {
  uint32_t u;
  if (get_u32(env, v, op, "fd", INT_MAX, &u)) return -1;
  *fd = (int)u;
  return 0;
}

static int is_nullish(napi_env env, napi_value v) {
  napi_valuetype t;
  return napi_typeof(env, v, &t) == napi_ok && (t == napi_undefined || t == napi_null);
}

// A Buffer or any Uint8Array; *data may be NULL when *len is 0.
static int get_bytes(napi_env env, napi_value v, const char *op, const char *name, void **data,
                     size_t *len) {
  bool is_ta = false;
  napi_typedarray_type type;
  if (napi_is_typedarray(env, v, &is_ta) != napi_ok || !is_ta ||
      napi_get_typedarray_info(env, v, &type, len, data, NULL, NULL) != napi_ok ||
      type != napi_uint8_array) {
    THROW_ARG(env, op, name, "%s: %s must be a Buffer (Uint8Array)", op, name);
    return -1;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Per-fd metadata cache (fds are process-wide, so the cache is too; guarded for worker threads).

enum { KIND_UNKNOWN = 0, KIND_MAP = 1 };

struct map_meta {
  uint32_t kind;
  uint32_t type;
  uint32_t key_size;
  uint32_t value_size;      // as the kernel reports it
  uint32_t user_value_size; // what a lookup/update buffer must hold (per-CPU maps: one slot per CPU)
  uint32_t max_entries;
};

static pthread_mutex_t meta_lock = PTHREAD_MUTEX_INITIALIZER;
static struct map_meta *meta_tab;
static size_t meta_cap;

static void meta_forget(int fd) {
  pthread_mutex_lock(&meta_lock);
  if ((size_t)fd < meta_cap) meta_tab[fd].kind = KIND_UNKNOWN;
  pthread_mutex_unlock(&meta_lock);
}

// What kind of file is fd? Writes e.g. "bpf-map", "bpf-prog", "socket" into out. 0 or -errno.
static int fd_kind(int fd, char *out, size_t outlen) {
  char path[64], link[128];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(path, link, sizeof link - 1);
  if (n < 0) return errno == ENOENT ? -EBADF : -errno;
  link[n] = 0;
  const char *k = strncmp(link, "anon_inode:", 11) == 0 ? link + 11 : link;
  snprintf(out, outlen, "%s", k);
  return 0;
}

static int is_percpu(uint32_t type) {
  return type == BPF_MAP_TYPE_PERCPU_HASH || type == BPF_MAP_TYPE_PERCPU_ARRAY ||
         type == BPF_MAP_TYPE_LRU_PERCPU_HASH || type == BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE;
}

// Fills *info from the kernel after checking fd is a map. 0, or throws and returns -1.
static int query_map_info(napi_env env, int fd, const char *op, struct bpf_map_info *info) {
  char kind[128];
  int err = fd_kind(fd, kind, sizeof kind);
  if (err) {
    throw_error(env, -err, op, NULL, "%s: fd %d", op, fd);
    return -1;
  }
  if (strcmp(kind, "bpf-map") != 0) {
    throw_error(env, EBADF, op, "fd", "%s: fd %d is not a BPF map (it is %s)", op, fd, kind);
    return -1;
  }
  uint32_t len = sizeof *info;
  memset(info, 0, sizeof *info);
  if (bpf_obj_get_info_by_fd(fd, info, &len) < 0) {
    throw_error(env, errno, "bpf_obj_get_info_by_fd", NULL, "%s: fd %d", op, fd);
    return -1;
  }
  return 0;
}

static int map_meta_get(napi_env env, int fd, const char *op, struct map_meta *m) {
  pthread_mutex_lock(&meta_lock);
  if ((size_t)fd < meta_cap && meta_tab[fd].kind == KIND_MAP) {
    *m = meta_tab[fd];
    pthread_mutex_unlock(&meta_lock);
    return 0;
  }
  pthread_mutex_unlock(&meta_lock);

  struct bpf_map_info info;
  if (query_map_info(env, fd, op, &info)) return -1;
  m->kind = KIND_MAP;
  m->type = info.type;
  m->key_size = info.key_size;
  m->value_size = info.value_size;
  m->max_entries = info.max_entries;
  m->user_value_size = info.value_size;
  if (is_percpu(info.type)) {
    int ncpu = libbpf_num_possible_cpus();
    if (ncpu <= 0) {
      throw_error(env, ncpu < 0 ? -ncpu : EINVAL, "libbpf_num_possible_cpus", NULL, "%s", op);
      return -1;
    }
    m->user_value_size = ((info.value_size + 7) & ~7u) * (uint32_t)ncpu;
  }

  pthread_mutex_lock(&meta_lock);
  if ((size_t)fd >= meta_cap) {
    size_t cap = meta_cap ? meta_cap : 64;
    while (cap <= (size_t)fd) cap *= 2;
    struct map_meta *t = realloc(meta_tab, cap * sizeof *t);
    if (t) {
      memset(t + meta_cap, 0, (cap - meta_cap) * sizeof *t);
      meta_tab = t;
      meta_cap = cap;
    }
  }
  if ((size_t)fd < meta_cap) meta_tab[fd] = *m; // if realloc failed we just don't cache
  pthread_mutex_unlock(&meta_lock);
  return 0;
}

// Checks a key buffer against the map. Queue/stack maps have key_size 0 and take no key.
static int check_key(napi_env env, const char *op, const char *name, const struct map_meta *m,
                     size_t len) {
  if (len != m->key_size) {
    THROW_ARG(env, op, name, "%s: %s is %zu bytes but the map's key size is %u", op, name, len,
              m->key_size);
    return -1;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// objGet(path: string): number

static napi_value obj_get(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (get_args(env, info, 1, argv)) return NULL;
  char path[PATH_MAX];
  size_t len = 0;
  napi_valuetype t;
  if (napi_typeof(env, argv[0], &t) != napi_ok || t != napi_string ||
      napi_get_value_string_utf8(env, argv[0], path, sizeof path, &len) != napi_ok || len == 0 ||
      len >= sizeof path - 1)
    return THROW_ARG(env, "objGet", "path", "objGet: path must be a non-empty string shorter than %d",
                     PATH_MAX - 1);
  if (strlen(path) != len)
    return THROW_ARG(env, "objGet", "path", "objGet: path contains a NUL character");
  int fd = bpf_obj_get(path);
  if (fd < 0) return throw_error(env, errno, "bpf_obj_get", NULL, "objGet(%s)", path);
  meta_forget(fd); // a previous owner of this fd number may have been closed behind our back
  napi_value r;
  napi_create_int32(env, fd, &r);
  return r;
}

// closeFd(fd): void

static napi_value close_fd(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (get_args(env, info, 1, argv) || get_fd(env, argv[0], "closeFd", &fd)) return NULL;
  meta_forget(fd);
  if (close(fd) < 0) return throw_error(env, errno, "close", NULL, "closeFd(%d)", fd);
  return NULL;
}

// ---------------------------------------------------------------------------------------------
// mapUpdate(fd, key, value, flags: 0|1|2): void

static napi_value map_update(napi_env env, napi_callback_info info) {
  static const char op[] = "mapUpdate";
  napi_value argv[4];
  int fd;
  uint32_t flags;
  void *key, *value;
  size_t klen, vlen;
  struct map_meta m;
  if (get_args(env, info, 4, argv) || get_fd(env, argv[0], op, &fd) ||
      get_bytes(env, argv[1], op, "key", &key, &klen) ||
      get_bytes(env, argv[2], op, "value", &value, &vlen) ||
      get_u32(env, argv[3], op, "flags", BPF_EXIST, &flags) || map_meta_get(env, fd, op, &m) ||
      check_key(env, op, "key", &m, klen))
    return NULL;
  if (vlen != m.user_value_size)
    return THROW_ARG(env, op, "value", "%s: value is %zu bytes but the map's value size is %u", op,
                     vlen, m.user_value_size);
  if (bpf_map_update_elem(fd, klen ? key : NULL, value, flags) < 0)
    return throw_error(env, errno, "bpf_map_update_elem", NULL, "%s(fd %d)", op, fd);
  return NULL;
}

// mapLookup(fd, key, out: Buffer): boolean — fills out (exactly the map's value size; the TS side
// allocates it from Node's buffer pool, much cheaper than napi_create_buffer) or returns false on
// ENOENT.

static napi_value map_lookup(napi_env env, napi_callback_info info) {
  static const char op[] = "mapLookup";
  napi_value argv[3], out;
  int fd;
  void *key, *data;
  size_t klen, vlen;
  struct map_meta m;
  if (get_args(env, info, 3, argv) || get_fd(env, argv[0], op, &fd) ||
      get_bytes(env, argv[1], op, "key", &key, &klen) ||
      get_bytes(env, argv[2], op, "valueSize", &data, &vlen) || map_meta_get(env, fd, op, &m) ||
      check_key(env, op, "key", &m, klen))
    return NULL;
  if (vlen != m.user_value_size)
    return THROW_ARG(env, op, "valueSize", "%s: valueSize is %zu but the map's value size is %u", op,
                     vlen, m.user_value_size);
  bool found = true;
  if (bpf_map_lookup_elem(fd, klen ? key : NULL, data) < 0) {
    if (errno != ENOENT)
      return throw_error(env, errno, "bpf_map_lookup_elem", NULL, "%s(fd %d)", op, fd);
    found = false;
  }
  napi_get_boolean(env, found, &out);
  return out;
}

// mapDelete(fd, key): boolean (false when the key was absent)

static napi_value map_delete(napi_env env, napi_callback_info info) {
  static const char op[] = "mapDelete";
  napi_value argv[2], out;
  int fd;
  void *key;
  size_t klen;
  struct map_meta m;
  if (get_args(env, info, 2, argv) || get_fd(env, argv[0], op, &fd) ||
      get_bytes(env, argv[1], op, "key", &key, &klen) || map_meta_get(env, fd, op, &m) ||
      check_key(env, op, "key", &m, klen))
    return NULL;
  bool deleted = true;
  if (bpf_map_delete_elem(fd, klen ? key : NULL) < 0) {
    if (errno != ENOENT)
      return throw_error(env, errno, "bpf_map_delete_elem", NULL, "%s(fd %d)", op, fd);
    deleted = false;
  }
  napi_get_boolean(env, deleted, &out);
  return out;
}

// mapNextKey(fd, key | null, out: Buffer): boolean — fills out (exactly the map's key size) with the
// key after key (the first key for null), or returns false after the last one.

static napi_value map_next_key(napi_env env, napi_callback_info info) {
  static const char op[] = "mapNextKey";
  napi_value argv[3], out;
  int fd;
  void *key = NULL, *next;
  size_t klen = 0, nlen;
  struct map_meta m;
  if (get_args(env, info, 3, argv) || get_fd(env, argv[0], op, &fd)) return NULL;
  int have_key = !is_nullish(env, argv[1]);
  if ((have_key && get_bytes(env, argv[1], op, "key", &key, &klen)) ||
      get_bytes(env, argv[2], op, "keySize", &next, &nlen) || map_meta_get(env, fd, op, &m))
    return NULL;
  if (nlen != m.key_size)
    return THROW_ARG(env, op, "keySize", "%s: keySize is %zu but the map's key size is %u", op, nlen,
                     m.key_size);
  if (have_key && check_key(env, op, "key", &m, klen)) return NULL;
  if (nlen == 0)
    return THROW_ARG(env, op, "fd", "%s: the map has no keys to iterate (key size 0)", op);
  bool found = true;
  if (bpf_map_get_next_key(fd, have_key ? key : NULL, next) < 0) {
    if (errno != ENOENT)
      return throw_error(env, errno, "bpf_map_get_next_key", NULL, "%s(fd %d)", op, fd);
    found = false;
  }
  napi_get_boolean(env, found, &out);
  return out;
}

// mapUpdateBatch(fd, keys, values, count, flags): number of elements written (== count)
// Uses BPF_MAP_UPDATE_BATCH; where the map type lacks it (EINVAL/ENOTSUPP/EOPNOTSUPP) it carries on
// element by element from wherever the batch stopped. On failure the error has `applied`: how many
// leading elements were written (elements are applied in order).

static napi_value map_update_batch(napi_env env, napi_callback_info info) {
  static const char op[] = "mapUpdateBatch";
  napi_value argv[5], out;
  int fd;
  uint32_t count, flags;
  void *keys, *values;
  size_t klen, vlen;
  struct map_meta m;
  if (get_args(env, info, 5, argv) || get_fd(env, argv[0], op, &fd) ||
      get_bytes(env, argv[1], op, "keys", &keys, &klen) ||
      get_bytes(env, argv[2], op, "values", &values, &vlen) ||
      get_u32(env, argv[3], op, "count", INT_MAX, &count) ||
      get_u32(env, argv[4], op, "flags", BPF_EXIST, &flags) || map_meta_get(env, fd, op, &m))
    return NULL;
  if (klen != (uint64_t)count * m.key_size)
    return THROW_ARG(env, op, "keys",
                     "%s: keys is %zu bytes but count %u x key size %u needs %llu", op, klen, count,
                     m.key_size, (unsigned long long)count * m.key_size);
  if (vlen != (uint64_t)count * m.user_value_size)
    return THROW_ARG(env, op, "values",
                     "%s: values is %zu bytes but count %u x value size %u needs %llu", op, vlen,
                     count, m.user_value_size, (unsigned long long)count * m.user_value_size);

  uint32_t done = 0;
  int err = 0;
  const char *failed_call = "bpf_map_update_batch";
  if (count > 0) {
    LIBBPF_OPTS(bpf_map_batch_opts, opts, .elem_flags = flags);
    uint32_t n = count;
    if (bpf_map_update_batch(fd, keys, values, &n, &opts) < 0) {
      err = errno;
      // The kernel writes back how many elements it applied only once it has started; an early
      // refusal (no batch op for this type, bad flags) leaves n as passed in. n < count is thus a
      // real partial count, and n == count means none was applied.
      done = n < count ? n : 0;
      if (err == EINVAL || err == ENOTSUPP || err == EOPNOTSUPP) {
        err = 0;
        failed_call = "bpf_map_update_elem";
        for (; done < count; done++) {
          if (bpf_map_update_elem(fd, (char *)keys + (size_t)done * m.key_size,
                                  (char *)values + (size_t)done * m.user_value_size, flags) < 0) {
            err = errno;
            break;
          }
        }
      }
    } else {
      done = count;
    }
  }
  if (err) {
    throw_error(env, err, failed_call, NULL, "%s(fd %d): element %u of %u", op, fd, done, count);
    // attach `applied` to the pending exception
    napi_value exc, v;
    if (napi_get_and_clear_last_exception(env, &exc) == napi_ok) {
      if (napi_create_uint32(env, done, &v) == napi_ok)
        napi_set_named_property(env, exc, "applied", v);
      napi_throw(env, exc);
    }
    return NULL;
  }
  napi_create_uint32(env, done, &out);
  return out;
}

// mapLookupBatch(fd, keys, values): number of elements read into keys/values from the start of
// the map, up to what the buffers hold (keys: n x key size, values: n x value size; a hash map's
// bucket is read whole or not at all, so buffers smaller than the map may be left partly unused). Uses
// BPF_MAP_LOOKUP_BATCH (one call per batch the kernel hands out); where the map type lacks it
// (EINVAL/ENOTSUPP/EOPNOTSUPP on the first call) it walks the keys with get_next_key + lookup. Not a
// snapshot: elements added or removed meanwhile may or may not be seen.

static napi_value map_lookup_batch(napi_env env, napi_callback_info info) {
  static const char op[] = "mapLookupBatch";
  napi_value argv[3], out;
  int fd;
  void *keys, *values;
  size_t klen, vlen;
  struct map_meta m;
  if (get_args(env, info, 3, argv) || get_fd(env, argv[0], op, &fd) ||
      get_bytes(env, argv[1], op, "keys", &keys, &klen) ||
      get_bytes(env, argv[2], op, "values", &values, &vlen) || map_meta_get(env, fd, op, &m))
    return NULL;
  if (m.key_size == 0 || klen % m.key_size != 0)
    return THROW_ARG(env, op, "keys", "%s: keys is %zu bytes, not a multiple of the key size %u", op,
                     klen, m.key_size);
  size_t max = klen / m.key_size;
  if (max > UINT32_MAX || vlen != max * m.user_value_size)
    return THROW_ARG(env, op, "values", "%s: values is %zu bytes but %zu keys x value size %u needs %zu",
                     op, vlen, max, m.user_value_size, max * m.user_value_size);
  // The batch token: a bucket index for hash maps, a key for arrays; room for either.
  uint64_t tok_in[8] = {0}, tok_out[8] = {0};
  if (m.key_size > sizeof tok_in)
    return THROW_ARG(env, op, "keys", "%s: key size %u is larger than this call supports", op, m.key_size);
  uint32_t done = 0;
  int first = 1;
  LIBBPF_OPTS(bpf_map_batch_opts, opts);
  while (done < max) {
    uint32_t n = (uint32_t)(max - done);
    int r = bpf_map_lookup_batch(fd, first ? NULL : tok_in, tok_out,
                                 (char *)keys + (size_t)done * m.key_size,
                                 (char *)values + (size_t)done * m.user_value_size, &n, &opts);
    int err = r < 0 ? errno : 0;
    if (err == ENOENT) { done += n; break; } // the end of the map; n elements came with it
    if (err == ENOSPC) break; // the next bucket does not fit in what is left of the buffers
    if (err && first && (err == EINVAL || err == ENOTSUPP || err == EOPNOTSUPP)) {
      // no batch op for this map type: walk it
      void *prev = NULL;
      for (; done < max; done++) {
        char *k = (char *)keys + (size_t)done * m.key_size;
        if (bpf_map_get_next_key(fd, prev, k) < 0) {
          if (errno == ENOENT) break;
          return throw_error(env, errno, "bpf_map_get_next_key", NULL, "%s(fd %d)", op, fd);
        }
        if (bpf_map_lookup_elem(fd, k, (char *)values + (size_t)done * m.user_value_size) < 0) {
          if (errno == ENOENT) { done--; continue; } // deleted meanwhile: skip it
          return throw_error(env, errno, "bpf_map_lookup_elem", NULL, "%s(fd %d)", op, fd);
        }
        prev = k;
      }
      break;
    }
    if (err) return throw_error(env, err, "bpf_map_lookup_batch", NULL, "%s(fd %d): after %u elements", op, fd, done);
    done += n;
    first = 0;
    memcpy(tok_in, tok_out, sizeof tok_in);
  }
  napi_create_uint32(env, done, &out);
  return out;
}

// mapInfo(fd): { type, typeName, keySize, valueSize, userValueSize, maxEntries, flags, name, id }

static napi_value set_u32(napi_env env, napi_value obj, const char *name, uint32_t x) {
  napi_value v;
  if (napi_create_uint32(env, x, &v) == napi_ok) napi_set_named_property(env, obj, name, v);
  return obj;
}

static void set_str(napi_env env, napi_value obj, const char *name, const char *s, size_t n) {
  napi_value v;
  if (napi_create_string_utf8(env, s, n, &v) == napi_ok) napi_set_named_property(env, obj, name, v);
}

static napi_value map_info(napi_env env, napi_callback_info info) {
  static const char op[] = "mapInfo";
  napi_value argv[1], out;
  int fd;
  struct bpf_map_info mi;
  if (get_args(env, info, 1, argv) || get_fd(env, argv[0], op, &fd)) return NULL;
  meta_forget(fd); // an explicit info query refreshes the cache too
  struct map_meta m;
  if (query_map_info(env, fd, op, &mi) || map_meta_get(env, fd, op, &m)) return NULL;
  if (napi_create_object(env, &out) != napi_ok) return NULL;
  set_u32(env, out, "type", mi.type);
  const char *tn = libbpf_bpf_map_type_str((enum bpf_map_type)mi.type);
  set_str(env, out, "typeName", tn ? tn : "unknown", NAPI_AUTO_LENGTH);
  set_u32(env, out, "keySize", mi.key_size);
  set_u32(env, out, "valueSize", mi.value_size);
  set_u32(env, out, "userValueSize", m.user_value_size);
  set_u32(env, out, "maxEntries", mi.max_entries);
  set_u32(env, out, "flags", mi.map_flags);
  set_str(env, out, "name", mi.name, strnlen(mi.name, sizeof mi.name));
  set_u32(env, out, "id", mi.id);
  return out;
}

// ---------------------------------------------------------------------------------------------
// progTestRun(fd, dataIn, dataSizeOut, ctxIn | null, repeat):
//   { retval, dataOut: Buffer, ctxOut?: Buffer, durationNs }

static napi_value prog_test_run(napi_env env, napi_callback_info info) {
  static const char op[] = "progTestRun";
  napi_value argv[5], out, v;
  int fd;
  void *data_in, *ctx_in = NULL;
  size_t dlen, clen = 0;
  uint32_t size_out, repeat;
  if (get_args(env, info, 5, argv) || get_fd(env, argv[0], op, &fd) ||
      get_bytes(env, argv[1], op, "dataIn", &data_in, &dlen) ||
      get_u32(env, argv[2], op, "dataSizeOut", 1u << 24, &size_out))
    return NULL;
  int have_ctx = !is_nullish(env, argv[3]);
  if ((have_ctx && get_bytes(env, argv[3], op, "ctxIn", &ctx_in, &clen)) ||
      get_u32(env, argv[4], op, "repeat", 1u << 30, &repeat))
    return NULL;
  if (dlen == 0 || dlen > UINT32_MAX)
    return THROW_ARG(env, op, "dataIn", "%s: dataIn must hold a packet (1 to 2^32-1 bytes)", op);
  if (have_ctx && (clen == 0 || clen > 4096))
    return THROW_ARG(env, op, "ctxIn", "%s: ctxIn must be 1 to 4096 bytes", op);

  char kind[128];
  int e = fd_kind(fd, kind, sizeof kind);
  if (e) return throw_error(env, -e, op, NULL, "%s: fd %d", op, fd);
  if (strcmp(kind, "bpf-prog") != 0)
    return throw_error(env, EBADF, op, "fd", "%s: fd %d is not a BPF program (it is %s)", op, fd,
                       kind);

  void *data_out = malloc(size_out ? size_out : 1);
  void *ctx_out = have_ctx ? malloc(clen) : NULL;
  if (!data_out || (have_ctx && !ctx_out)) {
    free(data_out);
    free(ctx_out);
    return throw_error(env, ENOMEM, "malloc", NULL, "%s", op);
  }
  LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = data_in, .data_size_in = (uint32_t)dlen,
              .data_out = data_out, .data_size_out = size_out, .repeat = (int)repeat);
  if (have_ctx) {
    opts.ctx_in = ctx_in;
    opts.ctx_size_in = (uint32_t)clen;
    opts.ctx_out = ctx_out;
    opts.ctx_size_out = (uint32_t)clen;
  }
  napi_value result = NULL;
  if (bpf_prog_test_run_opts(fd, &opts) < 0) {
    int err = errno;
    if (err == ENOSPC && opts.data_size_out > size_out)
      throw_error(env, err, "bpf_prog_test_run_opts", "dataSizeOut",
                  "%s: dataSizeOut %u is too small: the program left a %u-byte packet", op, size_out,
                  opts.data_size_out);
    else
      throw_error(env, err, "bpf_prog_test_run_opts", NULL, "%s(fd %d, %zu bytes)", op, fd, dlen);
    goto done;
  }
  if (napi_create_object(env, &out) != napi_ok) goto done;
  napi_create_uint32(env, opts.retval, &v);
  napi_set_named_property(env, out, "retval", v);
  uint32_t got = opts.data_size_out < size_out ? opts.data_size_out : size_out;
  if (napi_create_buffer_copy(env, got, data_out, NULL, &v) != napi_ok) goto done;
  napi_set_named_property(env, out, "dataOut", v);
  if (have_ctx) {
    uint32_t cgot = opts.ctx_size_out < clen ? opts.ctx_size_out : (uint32_t)clen;
    if (napi_create_buffer_copy(env, cgot, ctx_out, NULL, &v) != napi_ok) goto done;
    napi_set_named_property(env, out, "ctxOut", v);
  }
  napi_create_uint32(env, opts.duration, &v);
  napi_set_named_property(env, out, "durationNs", v);
  result = out;
done:
  free(data_out);
  free(ctx_out);
  return result;
}

// ---------------------------------------------------------------------------------------------
// ringbufWatch(fd, callback(records: Buffer)): watch — ringbufClose(watch, onClosed)
//
// libbpf's ring_buffer on the map, its epoll fd watched by the event loop (uv_poll, unref'd: the
// watch alone keeps no process alive). When records are ready they are consumed at once, and the
// callback gets them in one Buffer, each as written (the program's records are of one size).

struct watch {
  uv_poll_t poll;
  struct ring_buffer *rb;
  napi_env env;
  napi_ref callback, closed_callback;
  napi_async_context async;
  uint8_t *buf;
  size_t len, cap;
  int closed;
};

static int on_record(void *ctx, void *data, size_t size) {
  struct watch *w = ctx;
  if (w->len + size > w->cap) {
    size_t cap = w->cap ? w->cap : 4096;
    while (cap < w->len + size) cap *= 2;
    uint8_t *b = realloc(w->buf, cap);
    if (!b) return -ENOMEM; // the records left stay in the ring for the next wake-up
    w->buf = b;
    w->cap = cap;
  }
  memcpy(w->buf + w->len, data, size);
  w->len += size;
  return 0;
}

// Calls the function behind ref from the event loop, with the records (or none) as its argument.
static void call_back(struct watch *w, napi_ref ref, int with_records) {
  napi_env env = w->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, recv, arg, result;
  // (the receiver must be an object: napi_make_callback converts it, and undefined throws)
  if (napi_get_reference_value(env, ref, &cb) == napi_ok && cb && napi_get_global(env, &recv) == napi_ok &&
      (!with_records ||
       napi_create_buffer_copy(env, w->len, w->len ? w->buf : (const void *)"", NULL, &arg) == napi_ok))
    napi_make_callback(env, w->async, recv, cb, with_records ? 1 : 0, &arg, &result);
  bool pending = false;
  napi_value err;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending &&
      napi_get_and_clear_last_exception(env, &err) == napi_ok)
    napi_fatal_exception(env, err); // as an exception thrown by any other event-loop callback
  napi_close_handle_scope(env, scope);
}

static void on_readable(uv_poll_t *handle, int status, int events) {
  struct watch *w = handle->data;
  if (w->closed) return;
  w->len = 0;
  ring_buffer__consume(w->rb); // a failure (ENOMEM above) leaves records for the next call
  call_back(w, w->callback, 1);
}

static void on_closed(uv_handle_t *handle) {
  struct watch *w = handle->data;
  ring_buffer__free(w->rb);
  if (w->closed_callback) {
    call_back(w, w->closed_callback, 0);
    napi_delete_reference(w->env, w->closed_callback);
  }
  napi_delete_reference(w->env, w->callback);
  napi_async_destroy(w->env, w->async);
  free(w->buf);
  free(w);
}

static napi_value ringbuf_watch(napi_env env, napi_callback_info info) {
  static const char op[] = "ringbufWatch";
  napi_value argv[2];
  int fd;
  napi_valuetype t;
  if (get_args(env, info, 2, argv) || get_fd(env, argv[0], op, &fd)) return NULL;
  if (napi_typeof(env, argv[1], &t) != napi_ok || t != napi_function)
    return THROW_ARG(env, op, "callback", "%s: callback must be a function", op);
  struct map_meta m;
  if (map_meta_get(env, fd, op, &m)) return NULL;
  if (m.type != BPF_MAP_TYPE_RINGBUF) // (checked here: libbpf would also print to stderr)
    return throw_error(env, EINVAL, "ring_buffer__new", NULL, "%s(%d): not a ring buffer map", op, fd);
  struct watch *w = calloc(1, sizeof *w);
  if (!w) return throw_error(env, ENOMEM, "calloc", NULL, "%s", op);
  w->env = env;
  w->rb = ring_buffer__new(fd, on_record, w, NULL);
  if (!w->rb) {
    int err = errno;
    free(w);
    return throw_error(env, err, "ring_buffer__new", NULL, "%s(%d)", op, fd);
  }
  uv_loop_t *loop;
  napi_value name, resource;
  int r = -1;
  // (a NULL resource makes Node 20's napi_async_init throw)
  if (napi_get_uv_event_loop(env, &loop) == napi_ok &&
      napi_create_string_utf8(env, "tcp-stitch:ringbuf", NAPI_AUTO_LENGTH, &name) == napi_ok &&
      napi_create_object(env, &resource) == napi_ok &&
      napi_async_init(env, resource, name, &w->async) == napi_ok) {
    r = uv_poll_init(loop, &w->poll, ring_buffer__epoll_fd(w->rb));
    if (r == 0) {
      w->poll.data = w;
      r = uv_poll_start(&w->poll, UV_READABLE, on_readable);
      if (r != 0) {
        napi_create_reference(env, argv[1], 1, &w->callback);
        uv_close((uv_handle_t *)&w->poll, on_closed);
        return throw_error(env, -r, "uv_poll_start", NULL, "%s(%d)", op, fd);
      }
    } else {
      napi_async_destroy(env, w->async);
    }
  }
  if (r != 0) {
    ring_buffer__free(w->rb);
    free(w);
    return throw_error(env, r < 0 ? -r : EINVAL, "uv_poll_init", NULL, "%s(%d)", op, fd);
  }
  uv_unref((uv_handle_t *)&w->poll);
  napi_value ext;
  if (napi_create_reference(env, argv[1], 1, &w->callback) != napi_ok ||
      napi_create_external(env, w, NULL, NULL, &ext) != napi_ok) {
    w->closed = 1;
    uv_close((uv_handle_t *)&w->poll, on_closed);
    return NULL;
  }
  return ext;
}

// ringbufClose(watch, onClosed()): onClosed runs once the ring is unmapped and its fds closed.
static napi_value ringbuf_close(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  napi_valuetype t;
  void *p = NULL;
  if (get_args(env, info, 2, argv)) return NULL;
  if (napi_typeof(env, argv[0], &t) != napi_ok || t != napi_external ||
      napi_get_value_external(env, argv[0], &p) != napi_ok || !p)
    return THROW_ARG(env, "ringbufClose", "watch", "ringbufClose: watch must be what ringbufWatch returned");
  if (napi_typeof(env, argv[1], &t) != napi_ok || t != napi_function)
    return THROW_ARG(env, "ringbufClose", "onClosed", "ringbufClose: onClosed must be a function");
  struct watch *w = p;
  if (w->closed) return NULL;
  if (napi_create_reference(env, argv[1], 1, &w->closed_callback) != napi_ok) return NULL;
  w->closed = 1;
  uv_poll_stop(&w->poll);
  uv_close((uv_handle_t *)&w->poll, on_closed); // frees w: the external must not be used again
  return NULL;
}

// ---------------------------------------------------------------------------------------------

static napi_value init(napi_env env, napi_value exports) {
  static const struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
      {"objGet", obj_get},           {"closeFd", close_fd},
      {"mapUpdate", map_update},     {"mapLookup", map_lookup},
      {"mapDelete", map_delete},     {"mapNextKey", map_next_key},
      {"mapUpdateBatch", map_update_batch}, {"mapLookupBatch", map_lookup_batch},
      {"mapInfo", map_info},
      {"progTestRun", prog_test_run},
      {"ringbufWatch", ringbuf_watch}, {"ringbufClose", ringbuf_close},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value f;
    if (napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &f) != napi_ok ||
        napi_set_named_property(env, exports, fns[i].name, f) != napi_ok)
      return NULL;
  }
  napi_value v;
  napi_create_int32(env, BPF_ANY, &v);
  napi_set_named_property(env, exports, "BPF_ANY", v);
  napi_create_int32(env, BPF_NOEXIST, &v);
  napi_set_named_property(env, exports, "BPF_NOEXIST", v);
  napi_create_int32(env, BPF_EXIST, &v);
  napi_set_named_property(env, exports, "BPF_EXIST", v);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
