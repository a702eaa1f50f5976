/*
 * modeld's token loop in C: one call per generation, the GIL released for all of it.
 *
 *   prompt --llama_decode--> sample --> EOG? --> token_to_piece --> text assembler --> ring
 *                 ^                                                                     |
 *                 +------------------------ llama_decode(token) <-----------------------+
 *
 * Three pieces, each usable from Python:
 *
 *   TokenRing      a bounded SPSC byte ring (C11 atomics). The consumer sleeps on an
 *                  eventfd that is written only when the ring turns non-empty (once per
 *                  drain) and on finish; a producer facing a full ring sleeps on a futex
 *                  that drain() and cancel() wake.
 *   TextAssembler  holds back an unfinished UTF-8 character and any prefix of a stop
 *                  string; the C twin of modeld.engine.textstream.TextAssembler.
 *   run()          the loop itself, mirroring modeld.engine.pyloop.PythonTokenLoop.
 *
 * llama.cpp is not linked: bind() resolves the few functions used below with dlsym from
 * the libllama that llama-cpp-python has already loaded, so the declarations here must
 * match the llama.h of the pinned llama-cpp-python (0.3.36; checked in cloop.py).
 *
 * Off the GIL nothing touches a PyObject: run() copies its inputs into a loop_state with
 * the GIL held, runs, records status codes, and builds Python objects after re-acquiring.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------ */
/* llama.cpp: only what this file uses, as declared by llama.h of llama-cpp-python 0.3.36 */

typedef int32_t llama_token;
typedef int32_t llama_pos;
typedef int32_t llama_seq_id;
struct llama_context;
struct llama_vocab;
struct llama_sampler;
struct llama_memory_i;

typedef struct llama_batch {
    int32_t n_tokens;
    llama_token *token;
    float *embd;
    llama_pos *pos;
    int32_t *n_seq_id;
    llama_seq_id **seq_id;
    int8_t *logits;
} llama_batch;

struct llama_sampler_chain_params {
    bool no_perf;
};

typedef bool (*ggml_abort_callback)(void *data);

#define LLAMA_FUNCTIONS(X)                                                                 \
    X(llama_batch, llama_batch_get_one, (llama_token * tokens, int32_t n_tokens))         \
    X(int32_t, llama_decode, (struct llama_context * ctx, llama_batch batch))              \
    X(struct llama_memory_i *, llama_get_memory, (const struct llama_context *ctx))        \
    X(void, llama_memory_clear, (struct llama_memory_i * mem, bool data))                  \
    X(uint32_t, llama_n_ctx, (const struct llama_context *ctx))                            \
    X(void, llama_set_abort_callback,                                                      \
      (struct llama_context * ctx, ggml_abort_callback callback, void *data))              \
    X(struct llama_sampler_chain_params, llama_sampler_chain_default_params, (void))       \
    X(struct llama_sampler *, llama_sampler_chain_init,                                    \
      (struct llama_sampler_chain_params params))                                          \
    X(void, llama_sampler_chain_add, (struct llama_sampler * chain, struct llama_sampler * s)) \
    X(struct llama_sampler *, llama_sampler_init_penalties,                                \
      (int32_t n_vocab, int32_t last_n, float repeat, float freq, float present))          \
    X(struct llama_sampler *, llama_sampler_init_greedy, (void))                           \
    X(struct llama_sampler *, llama_sampler_init_top_k, (int32_t k))                       \
    X(struct llama_sampler *, llama_sampler_init_typical, (float p, size_t min_keep))      \
    X(struct llama_sampler *, llama_sampler_init_top_p, (float p, size_t min_keep))        \
    X(struct llama_sampler *, llama_sampler_init_min_p, (float p, size_t min_keep))        \
    X(struct llama_sampler *, llama_sampler_init_temp, (float t))                          \
    X(struct llama_sampler *, llama_sampler_init_dist, (uint32_t seed))                    \
    X(llama_token, llama_sampler_sample,                                                   \
      (struct llama_sampler * s, struct llama_context * ctx, int32_t idx))                 \
    X(void, llama_sampler_free, (struct llama_sampler * s))                                \
    X(bool, llama_vocab_is_eog, (const struct llama_vocab *vocab, llama_token token))      \
    X(int32_t, llama_token_to_piece,                                                       \
      (const struct llama_vocab *vocab, llama_token token, char *buf, int32_t length,      \
       int32_t lstrip, bool special))

#define DECLARE_FIELD(ret, name, params) ret(*name) params;
typedef struct {
    LLAMA_FUNCTIONS(DECLARE_FIELD)
} llama_api;
#undef DECLARE_FIELD

/* Process-wide like the library it points into; written once, by bind(), with the GIL. */
static llama_api lib;
static void *lib_handle = NULL;

/* ------------------------------------------------------------------------------------ */
/* Small helpers */

static int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Sleep while *word == expected, at most `timeout` (NULL: no limit). True if a signal or
 * the timeout ended the sleep; EAGAIN and spurious wake-ups return false and just send the
 * caller round its loop. */
static bool
futex_wait(_Atomic uint32_t *word, uint32_t expected, const struct timespec *timeout)
{
    long rc = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected, timeout, NULL, 0);
    return rc == -1 && (errno == EINTR || errno == ETIMEDOUT);
}

static void
futex_wake_all(_Atomic uint32_t *word)
{
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* ------------------------------------------------------------------------------------ */
/* The ring, as plain C state (usable off the GIL) */

typedef struct {
    char *data;
    uint64_t capacity;
    _Atomic uint64_t head;          /* bytes ever written; stored by the producer */
    _Atomic uint64_t tail;          /* bytes ever read; stored by the consumer */
    _Atomic uint64_t tokens;        /* tokens pushed and not yet drained */
    _Atomic uint32_t space_seq;     /* futex word: bumped when space frees up, or on cancel */
    _Atomic int producer_waiting;   /* the producer sleeps (or is about to) on space_seq */
    _Atomic int consumer_notified;  /* wake_fd was written since the last drain */
    _Atomic int finished;
    _Atomic int cancelled;
    _Atomic int producer_busy;      /* a push or a loop owns the producer side */
    int wake_fd;                    /* -1 once closed */
} ring_t;

static bool
ring_is_cancelled(ring_t *r)
{
    return atomic_load_explicit(&r->cancelled, memory_order_acquire) != 0;
}

/* Wake a producer sleeping for space; called by drain and cancel. */
static void
ring_wake_producer(ring_t *r)
{
    atomic_fetch_add(&r->space_seq, 1);
    if (atomic_load(&r->producer_waiting)) {
        futex_wake_all(&r->space_seq);
    }
}

/* Write wake_fd only when the ring turns non-empty since the last drain. */
static void
ring_notify_consumer(ring_t *r)
{
    if (atomic_exchange(&r->consumer_notified, 1) == 0) {
        eventfd_write(r->wake_fd, 1);
    }
}

/* How long a Python-level push sleeps before it looks at pending signals: a signal that
 * lands just before the futex sleep does not interrupt it, so it must not wait forever. */
static const struct timespec SIGNAL_CHECK_INTERVAL = {0, 50 * 1000 * 1000};

/*
 * Sleep until the ring has room after `head`, without spinning. Returns the free bytes,
 * or 0 once cancelled, or 0 with *interrupted set when `interrupted` is given and a signal
 * (or SIGNAL_CHECK_INTERVAL) ended a sleep, so that the caller can run signal handlers.
 * The seq_cst order of (load seq, store waiting, re-check) against the waker's (store
 * tail/cancelled, bump seq, load waiting) means no wake-up is lost.
 */
static uint64_t
ring_wait_for_space(ring_t *r, uint64_t head, bool *interrupted)
{
    for (;;) {
        if (ring_is_cancelled(r)) {
            return 0;
        }
        uint64_t used = head - atomic_load(&r->tail);
        if (used < r->capacity) {
            return r->capacity - used;
        }
        uint32_t seq = atomic_load(&r->space_seq);
        atomic_store(&r->producer_waiting, 1);
        bool signalled = false;
        if (!atomic_load(&r->cancelled) && head - atomic_load(&r->tail) >= r->capacity) {
            signalled = futex_wait(&r->space_seq, seq,
                                   interrupted != NULL ? &SIGNAL_CHECK_INTERVAL : NULL);
        }
        atomic_store(&r->producer_waiting, 0);
        if (signalled && interrupted != NULL) {
            *interrupted = true;
            return 0;
        }
    }
}

typedef enum { PUSH_DONE, PUSH_CANCELLED, PUSH_INTERRUPTED } push_status;

/* A push in progress: the bytes still to copy, and whether its tokens are counted yet. */
typedef struct {
    const char *src; /* may be NULL when len is 0 */
    size_t len;
    uint64_t tokens;
    bool counted;
} push_job;

/* Producer side. Blocks while full; stops, having pushed part of the job, once cancelled
 * or (when interruptible) when a signal arrives, so that Python can run its handlers. */
static push_status
ring_push_job(ring_t *r, push_job *job, bool interruptible)
{
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    do {
        bool interrupted = false;
        uint64_t room = ring_wait_for_space(r, head, interruptible ? &interrupted : NULL);
        if (room == 0) {
            return interrupted ? PUSH_INTERRUPTED : PUSH_CANCELLED;
        }
        size_t n = job->len < room ? job->len : (size_t)room;
        size_t at = (size_t)(head % r->capacity);
        size_t before_wrap = n < r->capacity - at ? n : (size_t)(r->capacity - at);
        if (n > 0) {
            memcpy(r->data + at, job->src, before_wrap);
            memcpy(r->data, job->src + before_wrap, n - before_wrap);
        }
        head += n;
        job->src += n;
        job->len -= n;
        atomic_store(&r->head, head);
        if (!job->counted) {
            /* after the bytes, so that a drain never counts tokens whose bytes it lacks */
            atomic_fetch_add(&r->tokens, job->tokens);
            job->counted = true;
        }
        ring_notify_consumer(r);
    } while (job->len > 0);
    return PUSH_DONE;
}

/* The loop's push: blocks while full; false (nothing more pushed) once cancelled. */
static bool
ring_push(ring_t *r, const char *src, size_t len, uint64_t tokens)
{
    push_job job = {src, len, tokens, false};
    return ring_push_job(r, &job, false) == PUSH_DONE;
}

static void
ring_wait_cancelled(ring_t *r)
{
    for (;;) {
        uint32_t seq = atomic_load(&r->space_seq);
        atomic_store(&r->producer_waiting, 1);
        if (atomic_load(&r->cancelled)) {
            break;
        }
        futex_wait(&r->space_seq, seq, NULL);
    }
    atomic_store(&r->producer_waiting, 0);
}

/* ------------------------------------------------------------------------------------ */
/* Text assembly: the C twin of textstream.TextAssembler */

typedef struct {
    char **items;
    size_t *lens;
    size_t count;
} stop_set;

typedef struct {
    const stop_set *stops;
    char *pending;
    size_t len;
    size_t cap;
    bool stopped;
} text_asm;

/* Length of a trailing, still-valid but unfinished UTF-8 sequence (0 to 3 bytes). */
static size_t
utf8_incomplete_tail(const unsigned char *data, size_t n)
{
    size_t limit = n < 4 ? n : 4;
    for (size_t back = 1; back <= limit; back++) {
        unsigned char byte = data[n - back];
        size_t need;
        if ((byte & 0xC0) == 0x80) {
            continue;
        }
        if ((byte & 0x80) == 0) {
            return 0;
        }
        if ((byte & 0xE0) == 0xC0) {
            need = 2;
        }
        else if ((byte & 0xF0) == 0xE0) {
            need = 3;
        }
        else if ((byte & 0xF8) == 0xF0) {
            need = 4;
        }
        else {
            return 0;
        }
        return back < need ? back : 0;
    }
    return 0;
}

/* Longest suffix of data that is a proper prefix of some stop string. */
static size_t
stop_prefix_hold(const char *data, size_t n, const stop_set *stops)
{
    size_t best = 0;
    for (size_t i = 0; i < stops->count; i++) {
        size_t k = stops->lens[i] - 1 < n ? stops->lens[i] - 1 : n;
        for (; k > best; k--) {
            if (memcmp(data + n - k, stops->items[i], k) == 0) {
                best = k;
                break;
            }
        }
    }
    return best;
}

static bool
text_reserve(text_asm *t, size_t need)
{
    if (need <= t->cap) {
        return true;
    }
    size_t cap = t->cap ? t->cap : 64;
    while (cap < need) {
        cap *= 2;
    }
    char *grown = PyMem_RawRealloc(t->pending, cap);
    if (grown == NULL) {
        return false;
    }
    t->pending = grown;
    t->cap = cap;
    return true;
}

/*
 * Add one token's piece. On success sets *release to how many bytes at the front of
 * t->pending may be emitted now (the caller emits them, then calls text_consume). Sets
 * t->stopped when a stop string completed: the released bytes end just before it.
 */
static bool
text_feed(text_asm *t, const char *piece, size_t n, size_t *release)
{
    *release = 0;
    if (t->stopped || (n == 0 && t->len == 0)) {
        return true;
    }
    if (!text_reserve(t, t->len + n)) {
        return false;
    }
    if (n > 0) {
        memcpy(t->pending + t->len, piece, n);
    }
    t->len += n;
    size_t cut = SIZE_MAX;
    for (size_t i = 0; i < t->stops->count; i++) {
        const char *hit = memmem(t->pending, t->len, t->stops->items[i], t->stops->lens[i]);
        if (hit != NULL && (size_t)(hit - t->pending) < cut) {
            cut = (size_t)(hit - t->pending);
        }
    }
    if (cut != SIZE_MAX) {
        t->stopped = true;
        *release = cut;
        return true;
    }
    size_t hold = stop_prefix_hold(t->pending, t->len, t->stops);
    size_t tail = utf8_incomplete_tail((const unsigned char *)t->pending, t->len);
    *release = t->len - (hold > tail ? hold : tail);
    return true;
}

static void
text_consume(text_asm *t, size_t n)
{
    if (t->stopped) {
        t->len = 0;
        return;
    }
    if (n > 0) {
        memmove(t->pending, t->pending + n, t->len - n);
        t->len -= n;
    }
}

/* The held-back tail at the end of a generation: t->pending[0:*n], then empty. */
static void
text_flush(text_asm *t, size_t *n)
{
    *n = t->stopped ? 0 : t->len;
}

static void
stop_set_free(stop_set *stops)
{
    for (size_t i = 0; i < stops->count; i++) {
        PyMem_RawFree(stops->items[i]);
    }
    PyMem_RawFree(stops->items);
    PyMem_RawFree(stops->lens);
    stops->items = NULL;
    stops->lens = NULL;
    stops->count = 0;
}

/* Copy a sequence of bytes (or str, encoded UTF-8) into a stop_set; empty ones skipped. */
static int
stop_set_from_python(PyObject *seq, stop_set *stops)
{
    PyObject *fast = PySequence_Fast(seq, "stop strings must be a sequence");
    if (fast == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    stops->items = PyMem_RawCalloc(n ? (size_t)n : 1, sizeof(char *));
    stops->lens = PyMem_RawCalloc(n ? (size_t)n : 1, sizeof(size_t));
    stops->count = 0;
    if (stops->items == NULL || stops->lens == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        const char *bytes;
        Py_ssize_t len;
        if (PyUnicode_Check(item)) {
            bytes = PyUnicode_AsUTF8AndSize(item, &len);
            if (bytes == NULL) {
                goto fail;
            }
        }
        else if (PyBytes_Check(item)) {
            bytes = PyBytes_AS_STRING(item);
            len = PyBytes_GET_SIZE(item);
        }
        else {
            PyErr_SetString(PyExc_TypeError, "each stop string must be str or bytes");
            goto fail;
        }
        if (len == 0) {
            continue;
        }
        char *copy = PyMem_RawMalloc((size_t)len);
        if (copy == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        memcpy(copy, bytes, (size_t)len);
        stops->items[stops->count] = copy;
        stops->lens[stops->count] = (size_t)len;
        stops->count++;
    }
    Py_DECREF(fast);
    return 0;
fail:
    Py_DECREF(fast);
    stop_set_free(stops);
    return -1;
}

/* ------------------------------------------------------------------------------------ */
/* The loop (runs without the GIL) */

enum stop_code { STOP_STOP = 0, STOP_LENGTH = 1, STOP_CANCELLED = 2, STOP_ERROR = 3 };
enum loop_error { LOOP_OK = 0, LOOP_ERR_DECODE, LOOP_ERR_NO_MEMORY, LOOP_ERR_SAMPLER };

typedef struct {
    ring_t *ring;
    int pause_fd; /* test hook: signal it, then hold the first prompt decode until cancel */
    bool paused;
} abort_state;

typedef struct {
    /* inputs, prepared with the GIL */
    ring_t *ring;
    struct llama_context *ctx;
    const struct llama_vocab *vocab;
    llama_token *prompt;
    int32_t n_prompt;
    int32_t n_batch;
    int32_t n_vocab;
    int32_t penalty_last_n;
    int64_t max_tokens;
    double temperature;
    int32_t top_k;
    double top_p;
    double min_p;
    double repeat_penalty;
    uint32_t seed;
    text_asm text;
    llama_token *trace; /* NULL unless the caller asked for the sampled token ids */
    size_t trace_cap;
    abort_state abort;
    /* outputs, read after the GIL is back */
    size_t trace_len;
    enum stop_code stop_code;
    enum loop_error error;
    int32_t decode_status;
    int64_t completion_tokens;
    int64_t started_ns;
    int64_t first_token_ns;
    int64_t ended_ns;
} loop_state;

static bool
abort_if_cancelled(void *data)
{
    abort_state *abort = data;
    if (abort->pause_fd >= 0 && !abort->paused) {
        abort->paused = true;
        eventfd_write(abort->pause_fd, 1);
        ring_wait_cancelled(abort->ring);
    }
    return ring_is_cancelled(abort->ring);
}

/* The chain of llama-cpp-python 0.3.36 Llama._init_sampler, with its defaults. */
static struct llama_sampler *
build_sampler(const loop_state *s)
{
    struct llama_sampler *chain =
        lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params());
    if (chain == NULL) {
        return NULL;
    }
    lib.llama_sampler_chain_add(
        chain, lib.llama_sampler_init_penalties(
                   s->n_vocab, s->penalty_last_n, (float)s->repeat_penalty, 0.0f, 0.0f));
    if (s->temperature < 0.0) {
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(s->seed));
        return chain;
    }
    if (s->temperature == 0.0) {
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy());
        return chain;
    }
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(s->top_k));
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_typical(1.0f, 1));
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p((float)s->top_p, 1));
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p((float)s->min_p, 1));
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp((float)s->temperature));
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(s->seed));
    return chain;
}

/* Record why a decode failed: an abort or a failure after cancel counts as cancelled. */
static void
decode_failed(loop_state *s, int32_t status)
{
    if (ring_is_cancelled(s->ring)) {
        s->stop_code = STOP_CANCELLED;
        return;
    }
    s->stop_code = STOP_ERROR;
    s->error = LOOP_ERR_DECODE;
    s->decode_status = status;
}

static bool
eval_prompt(loop_state *s)
{
    for (int32_t at = 0; at < s->n_prompt; at += s->n_batch) {
        if (ring_is_cancelled(s->ring)) {
            s->stop_code = STOP_CANCELLED;
            return false;
        }
        int32_t n = s->n_prompt - at < s->n_batch ? s->n_prompt - at : s->n_batch;
        int32_t status = lib.llama_decode(s->ctx, lib.llama_batch_get_one(s->prompt + at, n));
        if (status != 0) {
            decode_failed(s, status);
            return false;
        }
    }
    return true;
}

/* token_to_piece into *buf, growing it when a piece is longer than it. -1: no memory. */
static int32_t
token_piece(loop_state *s, llama_token token, char **buf, int32_t *cap, char *stack_buf)
{
    int32_t n = lib.llama_token_to_piece(s->vocab, token, *buf, *cap, 0, false);
    if (n >= 0) {
        return n;
    }
    char *grown = PyMem_RawMalloc((size_t)-n);
    if (grown == NULL) {
        return -1;
    }
    if (*buf != stack_buf) {
        PyMem_RawFree(*buf);
    }
    *buf = grown;
    *cap = -n;
    n = lib.llama_token_to_piece(s->vocab, token, *buf, *cap, 0, false);
    return n < 0 ? 0 : n;
}

/* Emit what the assembler releases for one piece; false ends the loop (stop_code set). */
static bool
emit_piece(loop_state *s, const char *piece, size_t n)
{
    size_t release;
    if (!text_feed(&s->text, piece, n, &release)) {
        s->stop_code = STOP_ERROR;
        s->error = LOOP_ERR_NO_MEMORY;
        return false;
    }
    bool pushed = ring_push(s->ring, s->text.pending, release, 1);
    text_consume(&s->text, release);
    if (!pushed) {
        s->stop_code = STOP_CANCELLED;
        return false;
    }
    if (s->text.stopped) {
        s->stop_code = STOP_STOP;
        return false;
    }
    return true;
}

static void
generate(loop_state *s, struct llama_sampler *sampler)
{
    char stack_buf[256];
    char *piece = stack_buf;
    int32_t piece_cap = (int32_t)sizeof(stack_buf);
    int64_t n_past = s->n_prompt;
    int64_t n_ctx = (int64_t)lib.llama_n_ctx(s->ctx);
    for (;;) {
        llama_token token = lib.llama_sampler_sample(sampler, s->ctx, -1);
        if (s->first_token_ns == 0) {
            s->first_token_ns = now_ns();
        }
        if (s->trace != NULL && s->trace_len < s->trace_cap) {
            s->trace[s->trace_len++] = token;
        }
        if (ring_is_cancelled(s->ring)) {
            s->stop_code = STOP_CANCELLED;
            break;
        }
        if (lib.llama_vocab_is_eog(s->vocab, token)) {
            s->stop_code = STOP_STOP;
            break;
        }
        s->completion_tokens++;
        int32_t n = token_piece(s, token, &piece, &piece_cap, stack_buf);
        if (n < 0) {
            s->stop_code = STOP_ERROR;
            s->error = LOOP_ERR_NO_MEMORY;
            break;
        }
        if (!emit_piece(s, piece, (size_t)n)) {
            break;
        }
        if (s->completion_tokens >= s->max_tokens || n_past >= n_ctx) {
            s->stop_code = STOP_LENGTH; /* a full context ends as llama-server reports it */
            break;
        }
        int32_t status = lib.llama_decode(s->ctx, lib.llama_batch_get_one(&token, 1));
        if (status != 0) {
            decode_failed(s, status);
            break;
        }
        n_past++;
    }
    if (piece != stack_buf) {
        PyMem_RawFree(piece);
    }
}

static void
run_loop(loop_state *s)
{
    s->started_ns = now_ns();
    s->stop_code = STOP_LENGTH;
    lib.llama_memory_clear(lib.llama_get_memory(s->ctx), true);
    s->abort.ring = s->ring;
    lib.llama_set_abort_callback(s->ctx, abort_if_cancelled, &s->abort);
    struct llama_sampler *sampler = build_sampler(s);
    if (sampler == NULL) {
        s->stop_code = STOP_ERROR;
        s->error = LOOP_ERR_SAMPLER;
    }
    else {
        if (eval_prompt(s)) {
            generate(s, sampler);
        }
        lib.llama_sampler_free(sampler);
    }
    lib.llama_set_abort_callback(s->ctx, NULL, NULL);
    if (s->stop_code == STOP_LENGTH || s->stop_code == STOP_STOP) {
        size_t tail;
        text_flush(&s->text, &tail);
        if (tail > 0) {
            ring_push(s->ring, s->text.pending, tail, 0);
        }
    }
    s->ended_ns = now_ns();
}

/* ------------------------------------------------------------------------------------ */
/* Module state */

typedef struct {
    PyTypeObject *ring_type;
    PyTypeObject *assembler_type;
} module_state;

static module_state *
get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* ------------------------------------------------------------------------------------ */
/* TokenRing (Python type) */

typedef struct {
    PyObject_HEAD
    ring_t ring;
} TokenRingObject;

static PyObject *
ring_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"capacity_bytes", NULL};
    Py_ssize_t capacity = 64 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|n:TokenRing", keywords, &capacity)) {
        return NULL;
    }
    if (capacity < 16) {
        PyErr_SetString(PyExc_ValueError, "ring capacity must be at least 16 bytes");
        return NULL;
    }
    if (capacity > (Py_ssize_t)1 << 30) {
        PyErr_SetString(PyExc_ValueError, "ring capacity must be at most 1 GiB");
        return NULL;
    }
    TokenRingObject *self = (TokenRingObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    ring_t *r = &self->ring;
    r->wake_fd = -1;
    r->data = PyMem_RawMalloc((size_t)capacity);
    if (r->data == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    r->capacity = (uint64_t)capacity;
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->wake_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
ring_dealloc(TokenRingObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    if (self->ring.wake_fd >= 0) {
        close(self->ring.wake_fd);
    }
    PyMem_RawFree(self->ring.data);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static int
ring_check_open(TokenRingObject *self)
{
    if (self->ring.wake_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the ring is closed");
        return -1;
    }
    return 0;
}

/* Claim the producer side; the ring is single-producer and this makes misuse loud. */
static int
ring_claim_producer(TokenRingObject *self)
{
    if (ring_check_open(self) < 0) {
        return -1;
    }
    if (atomic_exchange(&self->ring.producer_busy, 1) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "the ring already has an active producer");
        return -1;
    }
    return 0;
}

static void
ring_release_producer(TokenRingObject *self)
{
    atomic_store(&self->ring.producer_busy, 0);
}

PyDoc_STRVAR(ring_fileno_doc,
             "fileno() -> int\n\nAn eventfd, readable once the ring turns non-empty or finishes.");

static PyObject *
ring_fileno(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (ring_check_open(self) < 0) {
        return NULL;
    }
    return PyLong_FromLong(self->ring.wake_fd);
}

PyDoc_STRVAR(ring_drain_doc,
             "drain() -> (bytes, int, bool)\n\nTake everything available without blocking: "
             "(text, tokens, finished). Clears the wake-up descriptor and wakes a producer "
             "waiting for space.");

static PyObject *
ring_drain(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    ring_t *r = &self->ring;
    if (ring_check_open(self) < 0) {
        return NULL;
    }
    eventfd_t ignored_count;
    eventfd_read(r->wake_fd, &ignored_count); /* EAGAIN when not set: fine */
    atomic_store(&r->consumer_notified, 0);
    int finished = atomic_load(&r->finished);
    uint64_t tokens = atomic_exchange(&r->tokens, 0);
    uint64_t head = atomic_load(&r->head);
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    size_t n = (size_t)(head - tail);
    PyObject *text = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (text == NULL) {
        atomic_fetch_add(&r->tokens, tokens);
        return NULL;
    }
    size_t at = (size_t)(tail % r->capacity);
    size_t before_wrap = n < r->capacity - at ? n : (size_t)(r->capacity - at);
    memcpy(PyBytes_AS_STRING(text), r->data + at, before_wrap);
    memcpy(PyBytes_AS_STRING(text) + before_wrap, r->data, n - before_wrap);
    atomic_store(&r->tail, head);
    if (n > 0) {
        ring_wake_producer(r);
    }
    return Py_BuildValue("(NKO)", text, (unsigned long long)tokens,
                         finished ? Py_True : Py_False);
}

PyDoc_STRVAR(ring_push_doc,
             "push(data, tokens) -> bool\n\nAppend data (made by `tokens` tokens); blocks, "
             "with the GIL released, while the ring is full. False once cancelled. Signal "
             "handlers run while it waits; if one raises, the rest of data is dropped.");

static PyObject *
ring_push_py(TokenRingObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t tokens;
    if (!PyArg_ParseTuple(args, "y*n:push", &data, &tokens)) {
        return NULL;
    }
    if (tokens < 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "tokens must not be negative");
        return NULL;
    }
    if (ring_claim_producer(self) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    ring_t *r = &self->ring;
    push_job job = {data.buf, (size_t)data.len, (uint64_t)tokens, false};
    push_status status;
    uint64_t used = atomic_load_explicit(&r->head, memory_order_relaxed) - atomic_load(&r->tail);
    if ((uint64_t)data.len < r->capacity - used || ring_is_cancelled(r)) {
        status = ring_push_job(r, &job, false); /* cannot wait: keep the GIL */
    }
    else {
        for (;;) {
            Py_BEGIN_ALLOW_THREADS
            status = ring_push_job(r, &job, true);
            Py_END_ALLOW_THREADS
            if (status != PUSH_INTERRUPTED) {
                break;
            }
            if (PyErr_CheckSignals() < 0) { /* e.g. KeyboardInterrupt: the rest is dropped */
                ring_release_producer(self);
                PyBuffer_Release(&data);
                return NULL;
            }
        }
    }
    ring_release_producer(self);
    PyBuffer_Release(&data);
    return PyBool_FromLong(status == PUSH_DONE);
}

PyDoc_STRVAR(ring_finish_doc, "finish() -> None\n\nMark the end of the stream and wake the consumer.");

static PyObject *
ring_finish(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (ring_check_open(self) < 0) {
        return NULL;
    }
    if (atomic_exchange(&self->ring.finished, 1) == 0) {
        eventfd_write(self->ring.wake_fd, 1);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(ring_cancel_doc,
             "cancel() -> None\n\nAsk the producer to stop; wakes it if it waits for space. "
             "Any thread, idempotent.");

static PyObject *
ring_cancel(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    atomic_store(&self->ring.cancelled, 1);
    ring_wake_producer(&self->ring);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(ring_close_doc,
             "close() -> None\n\nRelease the descriptor. Raises RuntimeError while a producer "
             "still uses the ring. Idempotent.");

static PyObject *
ring_close(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->ring.wake_fd < 0) {
        Py_RETURN_NONE;
    }
    if (atomic_load(&self->ring.producer_busy)) {
        PyErr_SetString(PyExc_RuntimeError, "cannot close a ring while its producer runs");
        return NULL;
    }
    close(self->ring.wake_fd);
    self->ring.wake_fd = -1;
    Py_RETURN_NONE;
}

static PyObject *
ring_get_cancelled(TokenRingObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(ring_is_cancelled(&self->ring));
}

static PyObject *
ring_get_capacity(TokenRingObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->ring.capacity);
}

static PyObject *
ring_get_producer_waiting(TokenRingObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(atomic_load(&self->ring.producer_waiting));
}

static PyMethodDef ring_methods[] = {
    {"fileno", (PyCFunction)ring_fileno, METH_NOARGS, ring_fileno_doc},
    {"drain", (PyCFunction)ring_drain, METH_NOARGS, ring_drain_doc},
    {"push", (PyCFunction)ring_push_py, METH_VARARGS, ring_push_doc},
    {"finish", (PyCFunction)ring_finish, METH_NOARGS, ring_finish_doc},
    {"cancel", (PyCFunction)ring_cancel, METH_NOARGS, ring_cancel_doc},
    {"close", (PyCFunction)ring_close, METH_NOARGS, ring_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ring_getset[] = {
    {"cancelled", (getter)ring_get_cancelled, NULL, "True once cancel() was called.", NULL},
    {"capacity_bytes", (getter)ring_get_capacity, NULL, "Bytes the ring holds at most.", NULL},
    {"producer_waiting", (getter)ring_get_producer_waiting, NULL,
     "True while the producer sleeps for space (or a paused prompt waits for cancel).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(ring_doc,
             "TokenRing(capacity_bytes=65536)\n\nBounded single-producer/single-consumer byte "
             "ring with a cancel flag and an eventfd; implements modeld.engine.base.TokenRing.");

static PyType_Slot ring_slots[] = {
    {Py_tp_new, ring_new},
    {Py_tp_dealloc, ring_dealloc},
    {Py_tp_methods, ring_methods},
    {Py_tp_getset, ring_getset},
    {Py_tp_doc, (void *)ring_doc},
    {0, NULL},
};

static PyType_Spec ring_spec = {
    .name = "modeld.engine._tokenloop.TokenRing",
    .basicsize = sizeof(TokenRingObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = ring_slots,
};

/* ------------------------------------------------------------------------------------ */
/* TextAssembler (Python type; lets tests compare the C rules with textstream's) */

typedef struct {
    PyObject_HEAD
    stop_set stops;
    text_asm text;
} AssemblerObject;

static PyObject *
assembler_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"stops", NULL};
    PyObject *stops;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:TextAssembler", keywords, &stops)) {
        return NULL;
    }
    AssemblerObject *self = (AssemblerObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    if (stop_set_from_python(stops, &self->stops) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->text.stops = &self->stops;
    return (PyObject *)self;
}

static void
assembler_dealloc(AssemblerObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    stop_set_free(&self->stops);
    PyMem_RawFree(self->text.pending);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyObject *
assembler_feed(AssemblerObject *self, PyObject *arg)
{
    Py_buffer piece;
    size_t release;
    if (PyObject_GetBuffer(arg, &piece, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    bool ok = text_feed(&self->text, piece.buf, (size_t)piece.len, &release);
    PyBuffer_Release(&piece);
    if (!ok) {
        return PyErr_NoMemory();
    }
    PyObject *out = PyBytes_FromStringAndSize(self->text.pending, (Py_ssize_t)release);
    if (out != NULL) {
        text_consume(&self->text, release);
    }
    return out;
}

static PyObject *
assembler_flush(AssemblerObject *self, PyObject *Py_UNUSED(ignored))
{
    size_t n;
    text_flush(&self->text, &n);
    PyObject *out = PyBytes_FromStringAndSize(self->text.pending, (Py_ssize_t)n);
    if (out != NULL) {
        self->text.len = 0;
    }
    return out;
}

static PyObject *
assembler_get_stopped(AssemblerObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->text.stopped);
}

static PyMethodDef assembler_methods[] = {
    {"feed", (PyCFunction)assembler_feed, METH_O,
     "feed(piece) -> bytes\n\nAdd one token's piece; return the bytes now safe to emit."},
    {"flush", (PyCFunction)assembler_flush, METH_NOARGS,
     "flush() -> bytes\n\nThe held-back tail, unless a stop string was hit."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef assembler_getset[] = {
    {"stopped", (getter)assembler_get_stopped, NULL, "True once a stop string completed.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot assembler_slots[] = {
    {Py_tp_new, assembler_new},
    {Py_tp_dealloc, assembler_dealloc},
    {Py_tp_methods, assembler_methods},
    {Py_tp_getset, assembler_getset},
    {Py_tp_doc, "TextAssembler(stops)\n\nThe C loop's text rules, exposed for tests."},
    {0, NULL},
};

static PyType_Spec assembler_spec = {
    .name = "modeld.engine._tokenloop.TextAssembler",
    .basicsize = sizeof(AssemblerObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = assembler_slots,
};

/* ------------------------------------------------------------------------------------ */
/* Module functions */

PyDoc_STRVAR(bind_doc,
             "bind(library_path) -> None\n\nResolve llama.cpp's functions from the already "
             "loaded libllama at library_path. Raises ImportError if it is not loaded or a "
             "symbol is missing. Later calls with the same library do nothing.");

static PyObject *
tokenloop_bind(PyObject *Py_UNUSED(module), PyObject *arg)
{
    PyObject *encoded;
    if (!PyUnicode_FSConverter(arg, &encoded)) {
        return NULL;
    }
    const char *path = PyBytes_AS_STRING(encoded);
    /* RTLD_NOLOAD: use the copy llama-cpp-python loaded, never load a second one. */
    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (handle == NULL) {
        PyErr_Format(PyExc_ImportError,
                     "libllama at %s is not loaded in this process (import llama_cpp first): %s",
                     path, dlerror());
        Py_DECREF(encoded);
        return NULL;
    }
    if (lib_handle != NULL) {
        dlclose(handle); /* drops the reference NOLOAD took */
        if (handle != lib_handle) {
            PyErr_Format(PyExc_ImportError, "already bound to another libllama than %s", path);
            Py_DECREF(encoded);
            return NULL;
        }
        Py_DECREF(encoded);
        Py_RETURN_NONE;
    }
    llama_api resolved;
    void *symbol;
#define RESOLVE(ret, name, params)                                                         \
    symbol = dlsym(handle, #name);                                                         \
    if (symbol == NULL) {                                                                  \
        PyErr_Format(PyExc_ImportError, "llama.cpp function %s not found in %s", #name, path); \
        dlclose(handle);                                                                   \
        Py_DECREF(encoded);                                                                \
        return NULL;                                                                       \
    }                                                                                      \
    resolved.name = (ret(*) params)symbol;
    LLAMA_FUNCTIONS(RESOLVE)
#undef RESOLVE
    lib = resolved;
    lib_handle = handle; /* kept open for the life of the process, like llama_cpp's own */
    Py_DECREF(encoded);
    Py_RETURN_NONE;
}

/* Copy the prompt into a C array; every token must fit llama_token. */
static llama_token *
prompt_from_python(PyObject *seq, int32_t *n_out)
{
    PyObject *fast = PySequence_Fast(seq, "prompt tokens must be a sequence of int");
    if (fast == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n < 1 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "the prompt must hold at least one token");
        Py_DECREF(fast);
        return NULL;
    }
    llama_token *tokens = PyMem_RawMalloc((size_t)n * sizeof(llama_token));
    if (tokens == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long value = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (value == -1 && PyErr_Occurred()) {
            goto fail;
        }
        if (value < 0 || value > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "prompt token %ld is out of range", value);
            goto fail;
        }
        tokens[i] = (llama_token)value;
    }
    Py_DECREF(fast);
    *n_out = (int32_t)n;
    return tokens;
fail:
    Py_DECREF(fast);
    PyMem_RawFree(tokens);
    return NULL;
}

static PyObject *
trace_to_python(const loop_state *s)
{
    if (s->trace == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *list = PyList_New((Py_ssize_t)s->trace_len);
    if (list == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < s->trace_len; i++) {
        PyObject *token = PyLong_FromLong(s->trace[i]);
        if (token == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, token);
    }
    return list;
}

static PyObject *
error_to_python(const loop_state *s)
{
    switch (s->error) {
    case LOOP_OK:
        Py_RETURN_NONE;
    case LOOP_ERR_DECODE:
        return PyUnicode_FromFormat("llama_decode returned %d", (int)s->decode_status);
    case LOOP_ERR_NO_MEMORY:
        return PyUnicode_FromString("out of memory in the token loop");
    case LOOP_ERR_SAMPLER:
        return PyUnicode_FromString("llama.cpp could not create the sampler chain");
    }
    return PyUnicode_FromString("unknown token loop error");
}

static PyObject *
outcome_to_python(const loop_state *s)
{
    int64_t first = s->first_token_ns ? s->first_token_ns : s->ended_ns;
    PyObject *error = error_to_python(s);
    if (error == NULL) {
        return NULL;
    }
    PyObject *trace = trace_to_python(s);
    if (trace == NULL) {
        Py_DECREF(error);
        return NULL;
    }
    return Py_BuildValue("(iLLLNN)", (int)s->stop_code, (long long)s->completion_tokens,
                         (long long)(first - s->started_ns),
                         (long long)(s->ended_ns - first), error, trace);
}

PyDoc_STRVAR(run_doc,
             "run(ring, ctx, vocab, prompt, n_batch, n_vocab, penalty_last_n, max_tokens, "
             "temperature, top_k, top_p, min_p, repeat_penalty, seed, stops, trace, pause_fd)\n"
             "-> (stop_code, completion_tokens, prompt_eval_ns, eval_ns, error, token_ids)\n\n"
             "One generation with the GIL released. ctx and vocab are addresses; the caller "
             "validates the parameters (see cloop.py). token_ids is None unless trace is true. "
             "pause_fd >= 0 is a test hook: the first prompt decode signals it and holds until "
             "the ring is cancelled.");

static PyObject *
tokenloop_run(PyObject *module, PyObject *args)
{
    module_state *st = get_state(module);
    PyObject *ring_obj, *prompt_obj, *stops_obj;
    unsigned long long ctx_addr, vocab_addr;
    long long max_tokens;
    unsigned int seed;
    int trace;
    loop_state s;
    memset(&s, 0, sizeof(s));
    if (!PyArg_ParseTuple(args, "O!KKOiiiLdiddd" "IOpi:run", st->ring_type, &ring_obj,
                          &ctx_addr, &vocab_addr, &prompt_obj, &s.n_batch, &s.n_vocab,
                          &s.penalty_last_n, &max_tokens, &s.temperature, &s.top_k, &s.top_p,
                          &s.min_p, &s.repeat_penalty, &seed, &stops_obj, &trace,
                          &s.abort.pause_fd)) {
        return NULL;
    }
    if (lib_handle == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() the llama.cpp library before run()");
        return NULL;
    }
    if (ctx_addr == 0 || vocab_addr == 0 || s.n_batch < 1 || max_tokens < 1) {
        PyErr_SetString(PyExc_ValueError, "null context/vocab, or n_batch/max_tokens < 1");
        return NULL;
    }
    TokenRingObject *ring = (TokenRingObject *)ring_obj;
    s.ring = &ring->ring;
    s.ctx = (struct llama_context *)(uintptr_t)ctx_addr;
    s.vocab = (const struct llama_vocab *)(uintptr_t)vocab_addr;
    s.max_tokens = max_tokens;
    s.seed = seed;
    stop_set stops = {0};
    s.text.stops = &stops;
    PyObject *result = NULL;
    s.prompt = prompt_from_python(prompt_obj, &s.n_prompt);
    if (s.prompt == NULL || stop_set_from_python(stops_obj, &stops) < 0) {
        goto done;
    }
    if (trace) {
        uint32_t n_ctx = lib.llama_n_ctx(s.ctx);
        s.trace_cap = (size_t)((uint64_t)max_tokens < n_ctx ? (uint64_t)max_tokens : n_ctx) + 2;
        s.trace = PyMem_RawMalloc(s.trace_cap * sizeof(llama_token));
        if (s.trace == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    if (ring_claim_producer(ring) < 0) {
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    run_loop(&s);
    Py_END_ALLOW_THREADS
    ring_release_producer(ring);
    result = outcome_to_python(&s);
done:
    PyMem_RawFree(s.prompt);
    PyMem_RawFree(s.trace);
    PyMem_RawFree(s.text.pending);
    stop_set_free(&stops);
    return result;
}

static PyMethodDef tokenloop_methods[] = {
    {"bind", (PyCFunction)tokenloop_bind, METH_O, bind_doc},
    {"run", (PyCFunction)tokenloop_run, METH_VARARGS, run_doc},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------------------------------ */
/* Module */

static int
tokenloop_exec(PyObject *module)
{
    module_state *st = get_state(module);
    st->ring_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &ring_spec, NULL);
    if (st->ring_type == NULL || PyModule_AddType(module, st->ring_type) < 0) {
        return -1;
    }
    st->assembler_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &assembler_spec, NULL);
    if (st->assembler_type == NULL || PyModule_AddType(module, st->assembler_type) < 0) {
        return -1;
    }
    return 0;
}

static int
tokenloop_traverse(PyObject *module, visitproc visit, void *arg)
{
    module_state *st = get_state(module);
    Py_VISIT(st->ring_type);
    Py_VISIT(st->assembler_type);
    return 0;
}

static int
tokenloop_clear(PyObject *module)
{
    module_state *st = get_state(module);
    Py_CLEAR(st->ring_type);
    Py_CLEAR(st->assembler_type);
    return 0;
}

static void
tokenloop_free(void *module)
{
    tokenloop_clear((PyObject *)module);
}

static PyModuleDef_Slot tokenloop_slots[] = {
    {Py_mod_exec, tokenloop_exec},
    {0, NULL},
};

PyDoc_STRVAR(module_doc,
             "modeld's C token loop: TokenRing, TextAssembler, bind() and run(). Use it "
             "through modeld.engine.cloop.CTokenLoop.");

static struct PyModuleDef tokenloop_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "modeld.engine._tokenloop",
    .m_doc = module_doc,
    .m_size = sizeof(module_state),
    .m_methods = tokenloop_methods,
    .m_slots = tokenloop_slots,
    .m_traverse = tokenloop_traverse,
    .m_clear = tokenloop_clear,
    .m_free = tokenloop_free,
};

PyMODINIT_FUNC
PyInit__tokenloop(void)
{
    return PyModuleDef_Init(&tokenloop_module);
}
