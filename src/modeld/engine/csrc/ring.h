/*
 * The token ring as plain C state: a bounded single-producer/single-consumer byte ring
 * (C11 atomics) that the loop writes into without the GIL.
 *
 * The consumer sleeps on an eventfd that is written only when the ring turns non-empty
 * (once per drain) and on finish; a producer facing a full ring sleeps on a futex that
 * drain and cancel wake.
 */
#ifndef MODELD_RING_H
#define MODELD_RING_H

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "alloc.h"

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
    _Atomic int wake_at_start;      /* the consumer wants a wake-up when a loop starts */
    int wake_fd;                    /* -1 once closed */
} ring_t;

typedef enum { RING_INIT_OK, RING_INIT_NO_MEMORY, RING_INIT_ERRNO } ring_init_status;

/* Allocate the buffer and the eventfd of a zeroed ring. On failure nothing is left to
 * release but what ring_destroy releases anyway; RING_INIT_ERRNO leaves errno set. */
static ring_init_status
ring_init(ring_t *r, uint64_t capacity)
{
    r->wake_fd = -1;
    r->data = MODELD_MALLOC((size_t)capacity);
    if (r->data == NULL) {
        return RING_INIT_NO_MEMORY;
    }
    r->capacity = capacity;
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return r->wake_fd < 0 ? RING_INIT_ERRNO : RING_INIT_OK;
}

/* Close the descriptor (idempotent); the buffer stays until ring_destroy. */
static void
ring_close_fd(ring_t *r)
{
    if (r->wake_fd >= 0) {
        close(r->wake_fd);
        r->wake_fd = -1;
    }
}

static void
ring_destroy(ring_t *r)
{
    ring_close_fd(r);
    MODELD_FREE(r->data);
    r->data = NULL;
}

static bool
ring_is_cancelled(ring_t *r)
{
    return atomic_load_explicit(&r->cancelled, memory_order_acquire) != 0;
}

/* Claim the producer side: false when another producer holds it (single producer). */
static bool
ring_claim_producer(ring_t *r)
{
    return atomic_exchange(&r->producer_busy, 1) == 0;
}

static void
ring_release_producer(ring_t *r)
{
    atomic_store(&r->producer_busy, 0);
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

/* Any thread, idempotent: the producer stops at its next check, or wakes if it waits. */
static void
ring_cancel(ring_t *r)
{
    atomic_store(&r->cancelled, 1);
    ring_wake_producer(r);
}

/* The end of the stream: wakes the consumer once. */
static void
ring_finish(ring_t *r)
{
    if (atomic_exchange(&r->finished, 1) == 0) {
        eventfd_write(r->wake_fd, 1);
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

/* A loop has started (the C loop: with the GIL released): wake the consumer once if it
 * asked for it (the wake_at_start flag), as a push would; a drain clears it. True when
 * it woke the consumer. */
static bool
ring_loop_started(ring_t *r)
{
    if (atomic_exchange(&r->wake_at_start, 0)) {
        ring_notify_consumer(r);
        return true;
    }
    return false;
}

/* Consumer side, between a wake-up and the drain that follows it: clear the wake-up
 * without taking anything, so that until that drain only ring_finish writes wake_fd
 * (pushes find consumer_notified set). True when the stream has already finished. The
 * flag is set before the read and `finished` loaded after it, so a finish either shows
 * here or leaves wake_fd readable. */
static bool
ring_watch_finish(ring_t *r)
{
    eventfd_t ignored_count;
    atomic_store(&r->consumer_notified, 1);
    eventfd_read(r->wake_fd, &ignored_count); /* EAGAIN when not set: fine */
    return atomic_load(&r->finished) != 0;
}

/* What a drain takes: `n` bytes from `tail` on, made by `tokens` tokens. */
typedef struct {
    uint64_t tail;
    size_t n;
    uint64_t tokens;
    bool finished;
} ring_drain_job;

/* Consumer side, first half: clear the wake-up and claim everything available. Then
 * either ring_drain_finish (after copying the bytes out) or ring_drain_abandon. */
static ring_drain_job
ring_drain_begin(ring_t *r)
{
    eventfd_t ignored_count;
    eventfd_read(r->wake_fd, &ignored_count); /* EAGAIN when not set: fine */
    atomic_store(&r->consumer_notified, 0);
    ring_drain_job job;
    job.finished = atomic_load(&r->finished) != 0;
    job.tokens = atomic_exchange(&r->tokens, 0);
    uint64_t head = atomic_load(&r->head);
    job.tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    job.n = (size_t)(head - job.tail);
    return job;
}

/* Copy the claimed bytes to dest (job->n bytes), free their space, wake the producer. */
static void
ring_drain_finish(ring_t *r, const ring_drain_job *job, char *dest)
{
    size_t at = (size_t)(job->tail % r->capacity);
    size_t before_wrap = job->n < r->capacity - at ? job->n : (size_t)(r->capacity - at);
    memcpy(dest, r->data + at, before_wrap);
    memcpy(dest + before_wrap, r->data, job->n - before_wrap);
    atomic_store(&r->tail, job->tail + job->n);
    if (job->n > 0) {
        ring_wake_producer(r);
    }
}

/* The bytes could not be taken: leave them, and their tokens, for the next drain. */
static void
ring_drain_abandon(ring_t *r, const ring_drain_job *job)
{
    atomic_fetch_add(&r->tokens, job->tokens);
}

/* How long an interruptible push sleeps before it looks at pending signals: a signal
 * that lands just before the futex sleep does not interrupt it, so it must not wait
 * forever. */
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

/* True when `len` more bytes fit now, or the ring is cancelled: a push that cannot wait. */
static bool
ring_push_cannot_block(ring_t *r, size_t len)
{
    uint64_t used = atomic_load_explicit(&r->head, memory_order_relaxed) - atomic_load(&r->tail);
    return (uint64_t)len < r->capacity - used || ring_is_cancelled(r);
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
 * or (when interruptible) when a signal arrives, so that the caller can run handlers. */
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

/* Sleep until the ring is cancelled (the prompt-pause test hook). */
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

#endif /* MODELD_RING_H */
