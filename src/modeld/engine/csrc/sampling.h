/*
 * Constrained sampling at free-decoding speed: the C twin of modeld.engine.fastgrammar.
 *
 * llama.cpp's grammar sampler checks every candidate against the grammar's stacks; on a
 * 262,144-token vocabulary that is most of a step. So, as llama.cpp's common sampler does
 * (common/sampling.cpp, grammar_first = false), the unconstrained choice is made first and
 * only the chosen token is checked; the full constrained pass (grammar on every candidate,
 * then the chain) runs only when the grammar rejects it. The result is token for token the
 * full pass's (tests/engine/test_fast_grammar.py):
 *
 *   greedy      the unconstrained argmax, if the grammar allows it, is the constrained
 *               argmax (the first maximum among a subset that contains it).
 *   top-k       the constrained chain keeps the k best tokens the grammar allows. The
 *               fast path sorts the best WALK_CANDIDATES (>= 4k) unconstrained tokens,
 *               checks only those, and when k of them pass hands exactly those k, in
 *               order, to the rest of the chain (typical, top-p, min-p, temperature,
 *               dist). The dist sampler draws once either way, so a seed's random
 *               sequence is the full pass's. Unlike llama.cpp's common sampler this never
 *               samples from the unconstrained distribution, whose draw would differ.
 *   otherwise   (top_k = 0, temperature < 0) the full pass: the constrained distribution
 *               needs every allowed token.
 *
 * Ties between exactly equal logits are the one difference: llama.cpp's own partial sort
 * leaves their order unspecified, and the two paths sort different arrays.
 */
#ifndef MODELD_SAMPLING_H
#define MODELD_SAMPLING_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>

#include "alloc.h"
#include "llama_api.h"

/* modeld.types.SamplingParams but its stop strings. Filled field by field, by name, in
 * _tokenloop.c (SAMPLING_FIELDS). */
typedef struct {
    int64_t max_tokens;
    double temperature;
    double top_p;
    int32_t top_k;
    double min_p;
    double repeat_penalty;
    uint32_t seed;
    double presence_penalty;
    double frequency_penalty;
    int32_t logprobs; /* -1 (None): none; n >= 0: the chosen token's and the n likeliest */
} sampling_params;

/* modeld.types.GrammarConstraint: what the grammar sampler is made from. */
typedef struct {
    char *text;               /* owned GBNF with a "root" rule; NULL: unconstrained */
    char **trigger_patterns;  /* owned, each owned; lazy when any pattern or token */
    size_t n_trigger_patterns;
    llama_token *trigger_tokens; /* owned */
    size_t n_trigger_tokens;
    bool full_pass; /* always the full constrained pass: today's chain, the reference */
} grammar_spec;

#define WALK_MIN_CANDIDATES 256

typedef struct {
    struct llama_sampler *penalties;
    struct llama_sampler *grammar;
    struct llama_sampler *top_k;  /* the chain's top-k; NULL unless sampling with top-k */
    struct llama_sampler *walk;   /* top-k over the candidates the fast path checks */
    struct llama_sampler *tail;   /* after top-k: greedy, or dist, or typical..dist */
    llama_token_data *cur;        /* n_vocab candidates, refilled every step */
    int32_t n_vocab;
    int32_t k;
    bool greedy;
    int64_t fast_tokens; /* chosen without the full pass */
    int64_t full_passes;
} fast_sampler;

static bool
grammar_spec_is_lazy(const grammar_spec *g)
{
    return g->n_trigger_patterns > 0 || g->n_trigger_tokens > 0;
}

/* The grammar sampler, lazy when the spec has triggers; NULL when llama.cpp refuses it. */
static struct llama_sampler *
grammar_spec_sampler(const grammar_spec *g, const struct llama_vocab *vocab)
{
    if (!grammar_spec_is_lazy(g)) {
        return lib.llama_sampler_init_grammar(vocab, g->text, "root");
    }
    return lib.llama_sampler_init_grammar_lazy_patterns(
        vocab, g->text, "root", (const char **)g->trigger_patterns, g->n_trigger_patterns,
        g->trigger_tokens, g->n_trigger_tokens);
}

static void
grammar_spec_free(grammar_spec *g)
{
    for (size_t i = 0; i < g->n_trigger_patterns; i++) {
        MODELD_FREE(g->trigger_patterns[i]);
    }
    MODELD_FREE(g->trigger_patterns);
    MODELD_FREE(g->trigger_tokens);
    MODELD_FREE(g->text);
    g->trigger_patterns = NULL;
    g->n_trigger_patterns = 0;
    g->trigger_tokens = NULL;
    g->n_trigger_tokens = 0;
    g->text = NULL;
}

/* What follows top-k in llama-cpp-python's chain (Llama._init_sampler). */
static struct llama_sampler *
tail_chain(const sampling_params *p)
{
    struct llama_sampler *chain =
        lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params());
    if (chain == NULL) {
        return NULL;
    }
    if (p->temperature < 0.0) {
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(p->seed));
    }
    else if (p->temperature == 0.0) {
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy());
    }
    else {
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_typical(1.0f, 1));
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p((float)p->top_p, 1));
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p((float)p->min_p, 1));
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp((float)p->temperature));
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(p->seed));
    }
    return chain;
}

static void
fast_sampler_free(fast_sampler *f)
{
    struct llama_sampler *owned[] = {f->penalties, f->grammar, f->top_k, f->walk, f->tail};
    for (size_t i = 0; i < sizeof(owned) / sizeof(owned[0]); i++) {
        if (owned[i] != NULL) {
            lib.llama_sampler_free(owned[i]);
        }
    }
    MODELD_FREE(f->cur);
    f->cur = NULL;
}

/* Takes ownership of `grammar`. False (everything freed) when a sampler or the candidate
 * array cannot be made. */
static bool
fast_sampler_init(fast_sampler *f, const sampling_params *p, struct llama_sampler *grammar,
                  int32_t n_vocab, int32_t penalty_last_n)
{
    f->grammar = grammar;
    f->n_vocab = n_vocab;
    f->greedy = p->temperature == 0.0;
    f->penalties = lib.llama_sampler_init_penalties(
        n_vocab, penalty_last_n, (float)p->repeat_penalty, (float)p->frequency_penalty,
        (float)p->presence_penalty);
    f->tail = tail_chain(p);
    f->cur = MODELD_MALLOC((size_t)n_vocab * sizeof(llama_token_data));
    bool ok = f->penalties != NULL && f->tail != NULL && f->cur != NULL;
    if (ok && p->temperature > 0.0) {
        f->top_k = lib.llama_sampler_init_top_k(p->top_k);
        ok = f->top_k != NULL;
        int64_t walk = 4 * (int64_t)p->top_k;
        walk = walk < WALK_MIN_CANDIDATES ? WALK_MIN_CANDIDATES : walk;
        if (ok && p->top_k > 0 && walk < n_vocab) {
            f->k = p->top_k;
            f->walk = lib.llama_sampler_init_top_k((int32_t)walk);
            ok = f->walk != NULL;
        }
    }
    if (!ok) {
        fast_sampler_free(f);
    }
    return ok;
}

/* Every candidate with its logit, the penalties applied (the chain's first step). */
static llama_token_data_array
fill_candidates(fast_sampler *f, const float *logits)
{
    for (int32_t i = 0; i < f->n_vocab; i++) {
        f->cur[i] = (llama_token_data){i, logits[i], 0.0f};
    }
    llama_token_data_array arr = {f->cur, (size_t)f->n_vocab, -1, false};
    lib.llama_sampler_apply(f->penalties, &arr);
    return arr;
}

static bool
grammar_allows(fast_sampler *f, llama_token token)
{
    llama_token_data single = {token, 1.0f, 0.0f};
    llama_token_data_array arr = {&single, 1, -1, false};
    lib.llama_sampler_apply(f->grammar, &arr);
    return arr.data[0].logit != -INFINITY;
}

/* The fast path; -1 when it cannot decide and the full pass must. */
static int64_t
fast_choice(fast_sampler *f, llama_token_data_array *arr)
{
    if (f->greedy) {
        lib.llama_sampler_apply(f->tail, arr);
        if (arr->selected >= 0 && grammar_allows(f, arr->data[arr->selected].id)) {
            return arr->selected;
        }
        return -1;
    }
    if (f->walk == NULL) {
        return -1;
    }
    lib.llama_sampler_apply(f->walk, arr);
    lib.llama_sampler_apply(f->grammar, arr);
    size_t kept = 0;
    for (size_t i = 0; i < arr->size && kept < (size_t)f->k; i++) {
        if (arr->data[i].logit != -INFINITY) {
            arr->data[kept++] = arr->data[i];
        }
    }
    if (kept < (size_t)f->k) {
        return -1;
    }
    arr->size = kept;
    arr->sorted = true;
    arr->selected = -1;
    lib.llama_sampler_apply(f->tail, arr);
    return arr->selected;
}

/* One token, accepted by every sampler as llama_sampler_sample() would; -1 when llama.cpp
 * gives no logits or selects nothing. */
static llama_token
fast_sampler_sample(fast_sampler *f, struct llama_context *ctx)
{
    const float *logits = lib.llama_get_logits_ith(ctx, -1);
    if (logits == NULL) {
        return -1;
    }
    llama_token_data_array arr = fill_candidates(f, logits);
    int64_t selected = fast_choice(f, &arr);
    if (selected >= 0) {
        f->fast_tokens++;
    }
    else {
        f->full_passes++;
        arr = fill_candidates(f, logits);
        lib.llama_sampler_apply(f->grammar, &arr);
        if (f->top_k != NULL) {
            lib.llama_sampler_apply(f->top_k, &arr);
        }
        lib.llama_sampler_apply(f->tail, &arr);
        selected = arr.selected;
        if (selected < 0 || (size_t)selected >= arr.size) {
            return -1;
        }
    }
    llama_token token = arr.data[selected].id;
    lib.llama_sampler_accept(f->penalties, token);
    lib.llama_sampler_accept(f->grammar, token);
    if (f->top_k != NULL) {
        lib.llama_sampler_accept(f->top_k, token);
    }
    lib.llama_sampler_accept(f->tail, token);
    return token;
}

#endif /* MODELD_SAMPLING_H */
