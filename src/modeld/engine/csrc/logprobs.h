/*
 * Log probabilities of sampled tokens, the C twin of modeld.engine.logprobs: computed only
 * when a request asks, and handed to the event loop beside the ring's text.
 *
 * What is reported is the log-softmax of the raw logits the sampler read (before
 * penalties, grammar, top-k/p, temperature), as OpenAI and llama-server report by default:
 * the chosen token's, and the `n_top` most likely tokens' (n_top <= LP_MAX_TOP), found in
 * one pass over the vocabulary that keeps only the best n_top (no sort of the vocabulary).
 * Order: higher logit first, a lower id first between equal logits.
 *
 * Records travel through a single-producer/single-consumer linked queue: the loop (no
 * GIL) appends a record before it pushes the token's text into the ring, so a consumer
 * that has drained a token's text always finds its record. The queue holds at most one
 * record per generated token (a bound the loop's max_tokens sets before it starts).
 */
#ifndef MODELD_LOGPROBS_H
#define MODELD_LOGPROBS_H

#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "alloc.h"
#include "llama_api.h"

#define LP_MAX_TOP 20 /* modeld.types.MAX_TOP_LOGPROBS */

/* One token of a record: its id, log probability, and its piece in the record's bytes. */
typedef struct {
    llama_token id;
    float logprob;
    uint32_t piece_at;
    uint32_t piece_len;
} lp_item;

/* items[0] is the sampled token, items[1..n_items) the most likely ones; their pieces
 * follow the items. */
typedef struct lp_record {
    _Atomic(struct lp_record *) next;
    int32_t n_items;
    uint32_t n_bytes;
    lp_item items[];
} lp_record;

typedef struct {
    lp_record *first; /* consumer: a drained record (or the initial stub) */
    lp_record *last;  /* producer: the newest record */
} lp_queue;

static const char *
lp_record_bytes(const lp_record *r)
{
    return (const char *)(r->items + r->n_items);
}

/* False when out of memory. */
static bool
lp_queue_init(lp_queue *q)
{
    q->first = MODELD_CALLOC(1, sizeof(lp_record));
    q->last = q->first;
    return q->first != NULL;
}

static void
lp_queue_free(lp_queue *q)
{
    lp_record *r = q->first;
    while (r != NULL) {
        lp_record *next = atomic_load(&r->next);
        MODELD_FREE(r);
        r = next;
    }
    q->first = q->last = NULL;
}

static void
lp_queue_push(lp_queue *q, lp_record *r)
{
    atomic_store_explicit(&r->next, NULL, memory_order_relaxed);
    atomic_store_explicit(&q->last->next, r, memory_order_release);
    q->last = r;
}

/* Consumer: the next published record (still owned by the queue until the following
 * lp_queue_pop), or NULL. */
static lp_record *
lp_queue_pop(lp_queue *q)
{
    lp_record *next = atomic_load_explicit(&q->first->next, memory_order_acquire);
    if (next != NULL) {
        MODELD_FREE(q->first);
        q->first = next;
    }
    return next;
}

/* The n_top best tokens into best[] (ids) in report order; returns how many. */
static int32_t
lp_top_tokens(const float *logits, int32_t n_vocab, int32_t n_top, llama_token *best)
{
    int32_t kept = 0;
    if (n_top <= 0) {
        return 0;
    }
    for (int32_t id = 0; id < n_vocab; id++) {
        float logit = logits[id];
        if (kept == n_top && !(logit > logits[best[kept - 1]])) {
            continue;
        }
        int32_t at = kept < n_top ? kept++ : kept - 1;
        while (at > 0 && logit > logits[best[at - 1]]) {
            best[at] = best[at - 1];
            at--;
        }
        best[at] = id;
    }
    return kept;
}

/* log(sum(exp(logits))), in double, shifted by the maximum. */
static double
lp_log_sum_exp(const float *logits, int32_t n_vocab)
{
    double max = -INFINITY;
    for (int32_t i = 0; i < n_vocab; i++) {
        max = logits[i] > max ? logits[i] : max;
    }
    double sum = 0.0;
    for (int32_t i = 0; i < n_vocab; i++) {
        sum += exp((double)logits[i] - max);
    }
    return max + log(sum);
}

/* A piece of at most `cap` bytes into dest; its length (0 when it does not fit). */
static uint32_t
lp_piece(const struct llama_vocab *vocab, llama_token id, char *dest, int32_t cap)
{
    int32_t n = lib.llama_token_to_piece(vocab, id, dest, cap, 0, false);
    return n > 0 ? (uint32_t)n : 0;
}

#define LP_PIECE_MAX 256 /* a longer alternative's piece is reported empty */

/* The record of `token` (whose piece the loop already has), or NULL when out of memory. */
static lp_record *
lp_record_make(const struct llama_vocab *vocab, const float *logits, int32_t n_vocab,
               int32_t n_top, llama_token token, const char *piece, size_t piece_len)
{
    llama_token best[LP_MAX_TOP];
    int32_t n_best = lp_top_tokens(logits, n_vocab, n_top, best);
    double lse = lp_log_sum_exp(logits, n_vocab);
    int32_t n_items = 1 + n_best;
    size_t cap = piece_len + (size_t)n_best * LP_PIECE_MAX;
    lp_record *r = MODELD_MALLOC(sizeof(lp_record) + (size_t)n_items * sizeof(lp_item) + cap);
    if (r == NULL) {
        return NULL;
    }
    r->n_items = n_items;
    char *bytes = (char *)(r->items + n_items);
    memcpy(bytes, piece, piece_len);
    r->items[0] = (lp_item){token, (float)((double)logits[token] - lse), 0, (uint32_t)piece_len};
    uint32_t at = (uint32_t)piece_len;
    for (int32_t i = 0; i < n_best; i++) {
        uint32_t n = lp_piece(vocab, best[i], bytes + at, LP_PIECE_MAX);
        r->items[1 + i] = (lp_item){best[i], (float)((double)logits[best[i]] - lse), at, n};
        at += n;
    }
    r->n_bytes = at;
    /* Shrink to the pieces' real size (a few bytes each, not LP_PIECE_MAX): records wait
     * here while a stream's client reads slowly, up to a ring's worth of tokens. */
    lp_record *fit =
        MODELD_REALLOC(r, sizeof(lp_record) + (size_t)n_items * sizeof(lp_item) + at);
    return fit != NULL ? fit : r;
}

#endif /* MODELD_LOGPROBS_H */
