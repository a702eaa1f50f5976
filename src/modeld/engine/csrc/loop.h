/*
 * The token loop itself, run without the GIL: the C twin of
 * modeld.engine.pyloop.PythonTokenLoop.
 *
 *   prompt --llama_decode--> sample --> EOG? --> token_to_piece --> text assembler --> ring
 *                 ^                                                                     |
 *                 +------------------------ llama_decode(token) <-----------------------+
 *
 * The caller fills a loop_state with the GIL held, calls run_loop() without it, and reads
 * the outcome (status codes, counts, times) after taking the GIL back.
 */
#ifndef MODELD_LOOP_H
#define MODELD_LOOP_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>

#include "alloc.h"
#include "llama_api.h"
#include "logprobs.h"
#include "ring.h"
#include "sampling.h"
#include "text_assembler.h"

enum stop_code { STOP_STOP = 0, STOP_LENGTH = 1, STOP_CANCELLED = 2, STOP_ERROR = 3 };
enum loop_error {
    LOOP_OK = 0,
    LOOP_ERR_DECODE,
    LOOP_ERR_NO_MEMORY,
    LOOP_ERR_SAMPLER,
    LOOP_ERR_GRAMMAR,
};

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
    llama_token *prompt; /* owned */
    int32_t n_prompt;
    int32_t n_cached; /* the KV holds prompt[0, n_cached) from the previous generation */
    int32_t n_swa;    /* the model's sliding attention window; 0 without one */
    int32_t n_batch;
    int32_t n_vocab;
    int32_t penalty_last_n;
    sampling_params sampling;
    grammar_spec grammar; /* its text NULL when sampling is unconstrained */
    stop_set stops; /* owned */
    text_asm text;
    llama_token *trace; /* owned: every sampled token id, an EOG included */
    size_t trace_cap;
    abort_state abort;
    lp_queue *logprobs; /* the ring's; written when sampling.logprobs >= 0 */
    /* outputs, read after the GIL is back */
    size_t trace_len;
    enum stop_code stop_code;
    enum loop_error error;
    int32_t decode_status;
    int64_t completion_tokens;
    int64_t fast_tokens; /* a grammar's tokens chosen without its full pass */
    int64_t full_passes;
    int32_t cached_tokens; /* prompt tokens whose KV was kept rather than evaluated */
    int64_t n_kv; /* the KV holds the first n_kv of prompt + trace; -1: unknown, clear it */
    int64_t started_ns;
    int64_t first_token_ns;
    int64_t ended_ns;
} loop_state;

static int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Room to record every sampled token id (at most max_tokens, or a context, plus an EOG):
 * the caller learns from them which tokens the KV holds. False when out of memory. */
static bool
loop_enable_trace(loop_state *s)
{
    uint64_t n_ctx = lib.llama_n_ctx(s->ctx);
    uint64_t max_tokens = (uint64_t)s->sampling.max_tokens;
    s->trace_cap = (size_t)(max_tokens < n_ctx ? max_tokens : n_ctx) + 2;
    s->trace = MODELD_MALLOC(s->trace_cap * sizeof(llama_token));
    return s->trace != NULL;
}

/* Free what the state owns; safe on a zeroed or partly filled state. */
static void
loop_state_release(loop_state *s)
{
    MODELD_FREE(s->prompt);
    s->prompt = NULL;
    MODELD_FREE(s->trace);
    s->trace = NULL;
    grammar_spec_free(&s->grammar);
    text_asm_free(&s->text);
    stop_set_free(&s->stops);
}

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

/* How a generation samples: llama-cpp-python's chain (free decoding, or a grammar's full
 * pass when the spec asks for it: the reference), or the fast sampler (csrc/sampling.h)
 * for a grammar. */
typedef struct {
    struct llama_sampler *chain;
    fast_sampler fast;
    bool use_fast;
} loop_sampler;

/* The chain of llama-cpp-python 0.3.36 Llama._init_sampler, with its defaults: penalties,
 * the grammar (before any selecting sampler, so a chosen token is always one the grammar
 * allows), then greedy or top_k..dist. */
static struct llama_sampler *
build_chain(const loop_state *s, struct llama_sampler *grammar)
{
    const sampling_params *p = &s->sampling;
    struct llama_sampler *chain =
        lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params());
    if (chain == NULL) {
        if (grammar != NULL) {
            lib.llama_sampler_free(grammar);
        }
        return NULL;
    }
    lib.llama_sampler_chain_add(
        chain, lib.llama_sampler_init_penalties(s->n_vocab, s->penalty_last_n,
                                                (float)p->repeat_penalty,
                                                (float)p->frequency_penalty,
                                                (float)p->presence_penalty));
    if (grammar != NULL) {
        lib.llama_sampler_chain_add(chain, grammar);
    }
    if (p->temperature < 0.0) {
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(p->seed));
        return chain;
    }
    if (p->temperature == 0.0) {
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy());
        return chain;
    }
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(p->top_k));
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_typical(1.0f, 1));
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p((float)p->top_p, 1));
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p((float)p->min_p, 1));
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp((float)p->temperature));
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(p->seed));
    return chain;
}

/* False with s->error set when a sampler cannot be made; a grammar llama.cpp refuses is
 * never used. */
static bool
build_sampler(loop_state *s, loop_sampler *out)
{
    struct llama_sampler *grammar = NULL;
    if (s->grammar.text != NULL) {
        grammar = grammar_spec_sampler(&s->grammar, s->vocab);
        if (grammar == NULL) {
            s->error = LOOP_ERR_GRAMMAR;
            return false;
        }
    }
    out->use_fast = grammar != NULL && !s->grammar.full_pass;
    if (out->use_fast) {
        if (!fast_sampler_init(&out->fast, &s->sampling, grammar, s->n_vocab,
                               s->penalty_last_n)) {
            s->error = LOOP_ERR_SAMPLER;
            return false;
        }
        return true;
    }
    out->chain = build_chain(s, grammar);
    if (out->chain == NULL) {
        s->error = LOOP_ERR_SAMPLER;
        return false;
    }
    return true;
}

static llama_token
sample_next(loop_sampler *ls, struct llama_context *ctx)
{
    if (ls->use_fast) {
        return fast_sampler_sample(&ls->fast, ctx);
    }
    return lib.llama_sampler_sample(ls->chain, ctx, -1);
}

static void
free_sampler(loop_state *s, loop_sampler *ls)
{
    if (ls->use_fast) {
        s->fast_tokens = ls->fast.fast_tokens;
        s->full_passes = ls->fast.full_passes;
        fast_sampler_free(&ls->fast);
    }
    else if (ls->chain != NULL) {
        lib.llama_sampler_free(ls->chain);
    }
}

/* Record why a decode failed: an abort or a failure after cancel counts as cancelled.
 * Either way the KV may hold part of that batch, so it is no longer known. */
static void
decode_failed(loop_state *s, int32_t status)
{
    s->n_kv = -1;
    if (ring_is_cancelled(s->ring)) {
        s->stop_code = STOP_CANCELLED;
        return;
    }
    s->stop_code = STOP_ERROR;
    s->error = LOOP_ERR_DECODE;
    s->decode_status = status;
}

/*
 * Keep the KV of prompt[0, n_cached) and drop everything after it, where llama.cpp can do
 * that exactly; otherwise clear the cache. Returns the tokens kept. Exact means: the cut
 * succeeded (a recurrent memory cannot cut a sequence), the sequence now ends where the
 * prefix does, and it still reaches back as far as a sliding window from the first new
 * token looks (a window cache may have dropped older cells; this is llama-server's rule).
 */
static int32_t
keep_cached_prefix(const loop_state *s)
{
    struct llama_memory_i *mem = lib.llama_get_memory(s->ctx);
    int32_t n = s->n_cached;
    llama_pos oldest_needed = s->n_swa > 0 && n > s->n_swa ? n - s->n_swa : 0;
    if (n > 0 && lib.llama_memory_seq_rm(mem, 0, n, -1) &&
        lib.llama_memory_seq_pos_max(mem, 0) == n - 1 &&
        lib.llama_memory_seq_pos_min(mem, 0) <= oldest_needed) {
        return n;
    }
    lib.llama_memory_clear(mem, true);
    return 0;
}

static bool
eval_prompt(loop_state *s)
{
    for (int32_t at = s->cached_tokens; at < s->n_prompt; at += s->n_batch) {
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
        s->n_kv = at + n;
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
    char *grown = MODELD_MALLOC((size_t)-n);
    if (grown == NULL) {
        return -1;
    }
    if (*buf != stack_buf) {
        MODELD_FREE(*buf);
    }
    *buf = grown;
    *cap = -n;
    n = lib.llama_token_to_piece(s->vocab, token, *buf, *cap, 0, false);
    return n < 0 ? 0 : n;
}

/* Queue the log probabilities of `token` (before its text reaches the ring); false when
 * out of memory. */
static bool
record_logprobs(loop_state *s, llama_token token, const char *piece, size_t n)
{
    const float *logits = lib.llama_get_logits_ith(s->ctx, -1);
    if (logits == NULL) {
        return false;
    }
    lp_record *r = lp_record_make(s->vocab, logits, s->n_vocab, s->sampling.logprobs, token,
                                  piece, n);
    if (r == NULL) {
        return false;
    }
    lp_queue_push(s->logprobs, r);
    return true;
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
generate(loop_state *s, loop_sampler *sampler)
{
    char stack_buf[256];
    char *piece = stack_buf;
    int32_t piece_cap = (int32_t)sizeof(stack_buf);
    int64_t n_past = s->n_prompt;
    int64_t n_ctx = (int64_t)lib.llama_n_ctx(s->ctx);
    for (;;) {
        llama_token token = sample_next(sampler, s->ctx);
        if (token < 0) {
            s->stop_code = STOP_ERROR;
            s->error = LOOP_ERR_SAMPLER;
            break;
        }
        if (s->first_token_ns == 0) {
            s->first_token_ns = now_ns();
        }
        if (s->trace_len < s->trace_cap) {
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
        if (s->sampling.logprobs >= 0 && !record_logprobs(s, token, piece, (size_t)n)) {
            s->stop_code = STOP_ERROR;
            s->error = LOOP_ERR_NO_MEMORY;
            break;
        }
        if (!emit_piece(s, piece, (size_t)n)) {
            break;
        }
        if (s->completion_tokens >= s->sampling.max_tokens || n_past >= n_ctx) {
            s->stop_code = STOP_LENGTH; /* a full context ends as llama-server reports it */
            break;
        }
        int32_t status = lib.llama_decode(s->ctx, lib.llama_batch_get_one(&token, 1));
        if (status != 0) {
            decode_failed(s, status);
            break;
        }
        n_past++;
        s->n_kv = n_past;
    }
    if (piece != stack_buf) {
        MODELD_FREE(piece);
    }
}

/* One generation: the ring's producer side must be claimed by the caller. */
static void
run_loop(loop_state *s)
{
    s->started_ns = now_ns();
    s->stop_code = STOP_LENGTH;
    s->text.stops = &s->stops;
    s->cached_tokens = keep_cached_prefix(s);
    s->n_kv = s->cached_tokens;
    s->abort.ring = s->ring;
    lib.llama_set_abort_callback(s->ctx, abort_if_cancelled, &s->abort);
    loop_sampler sampler;
    memset(&sampler, 0, sizeof(sampler));
    if (!build_sampler(s, &sampler)) {
        s->stop_code = STOP_ERROR;
    }
    else {
        if (eval_prompt(s)) {
            generate(s, &sampler);
        }
        free_sampler(s, &sampler);
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

#endif /* MODELD_LOOP_H */
