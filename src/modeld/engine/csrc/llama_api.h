/*
 * llama.cpp, as far as the token loop uses it: the declarations of llama.h from
 * llama-cpp-python 0.3.36 (the version is checked in cloop.py), and a table of function
 * pointers resolved with dlsym from the libllama that llama-cpp-python has already loaded.
 * llama.cpp is not linked.
 */
#ifndef MODELD_LLAMA_API_H
#define MODELD_LLAMA_API_H

#include <dlfcn.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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

typedef struct llama_token_data {
    llama_token id;
    float logit;
    float p;
} llama_token_data;

typedef struct llama_token_data_array {
    llama_token_data *data;
    size_t size;
    int64_t selected; /* an index into data, not a token id */
    bool sorted;
} llama_token_data_array;

typedef bool (*ggml_abort_callback)(void *data);

#define LLAMA_FUNCTIONS(X)                                                                 \
    X(llama_batch, llama_batch_get_one, (llama_token * tokens, int32_t n_tokens))         \
    X(int32_t, llama_decode, (struct llama_context * ctx, llama_batch batch))              \
    X(struct llama_memory_i *, llama_get_memory, (const struct llama_context *ctx))        \
    X(void, llama_memory_clear, (struct llama_memory_i * mem, bool data))                  \
    X(bool, llama_memory_seq_rm,                                                           \
      (struct llama_memory_i * mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1))      \
    X(llama_pos, llama_memory_seq_pos_min, (struct llama_memory_i * mem, llama_seq_id seq_id)) \
    X(llama_pos, llama_memory_seq_pos_max, (struct llama_memory_i * mem, llama_seq_id seq_id)) \
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
    X(struct llama_sampler *, llama_sampler_init_grammar,                                  \
      (const struct llama_vocab *vocab, const char *grammar_str, const char *grammar_root)) \
    X(struct llama_sampler *, llama_sampler_init_grammar_lazy_patterns,                    \
      (const struct llama_vocab *vocab, const char *grammar_str, const char *grammar_root, \
       const char **trigger_patterns, size_t num_trigger_patterns,                         \
       const llama_token *trigger_tokens, size_t num_trigger_tokens))                      \
    X(void, llama_sampler_apply, (struct llama_sampler * s, llama_token_data_array * cur_p)) \
    X(void, llama_sampler_accept, (struct llama_sampler * s, llama_token token))           \
    X(float *, llama_get_logits_ith, (struct llama_context * ctx, int32_t i))               \
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

/* Fill *api from an open libllama handle. NULL on success, else the first missing name. */
static const char *
llama_api_resolve(void *handle, llama_api *api)
{
    void *symbol;
#define RESOLVE(ret, name, params)                                                         \
    symbol = dlsym(handle, #name);                                                         \
    if (symbol == NULL) {                                                                  \
        return #name;                                                                      \
    }                                                                                      \
    api->name = (ret(*) params)symbol;
    LLAMA_FUNCTIONS(RESOLVE)
#undef RESOLVE
    return NULL;
}

#endif /* MODELD_LLAMA_API_H */
