/*
 * modeld's C token loop as a Python extension: TokenRing, TextAssembler, bind(), run().
 *
 * The C that runs without the GIL is in csrc/, in headers that never include Python.h
 * (tests/engine/test_c_headers.py keeps it so):
 *
 *   csrc/llama_api.h       llama.cpp's declarations and the table of its functions
 *   csrc/ring.h            the bounded SPSC byte ring (C11 atomics, eventfd, futex)
 *   csrc/text_assembler.h  UTF-8 and stop-string hold-back, the C twin of textstream.py
 *   csrc/loop.h            the loop itself, the C twin of pyloop.PythonTokenLoop
 *
 * This file is their Python side: the conversions between Python objects and that C
 * state (made with the GIL held), the two types, and the module. Off the GIL nothing
 * touches a PyObject: run() converts its inputs into a loop_state, releases the GIL for
 * run_loop(), and builds the outcome after taking it back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Every allocation of the pure-C parts goes through the raw allocator: usable without
 * the GIL, and seen by tracemalloc (tests/engine/test_token_loop_leaks.py). */
#define MODELD_MALLOC PyMem_RawMalloc
#define MODELD_CALLOC PyMem_RawCalloc
#define MODELD_REALLOC PyMem_RawRealloc
#define MODELD_FREE PyMem_RawFree

#include <dlfcn.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "csrc/loop.h"

/* ------------------------------------------------------------------------------------ */
/* Python -> C conversions (with the GIL) */

/* Copy a sequence of bytes (or str, encoded UTF-8) into a stop_set; empty ones skipped. */
static int
stop_set_from_python(PyObject *seq, stop_set *stops)
{
    PyObject *fast = PySequence_Fast(seq, "stop strings must be a sequence");
    if (fast == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (!stop_set_init(stops, (size_t)n)) {
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
        if (!stop_set_add(stops, bytes, (size_t)len)) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    Py_DECREF(fast);
    return 0;
fail:
    Py_DECREF(fast);
    stop_set_free(stops);
    return -1;
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

/*
 * The fields of modeld.types.SamplingParams, each read by its name into the member of
 * sampling_params that has the same name (FIELD names both from one token, so no two can
 * be swapped). `stop` becomes loop_state.stops. A new sampling parameter is a field in
 * types.py, a member of sampling_params (csrc/loop.h), and one line here;
 * tests/engine/test_sampling_fields.py fails until all three agree.
 */
/* FIELD_OPTIONAL_INT32: None reads as -1. */
typedef enum { FIELD_INT64, FIELD_INT32, FIELD_UINT32, FIELD_DOUBLE, FIELD_OPTIONAL_INT32 } field_kind;

typedef struct {
    const char *name;
    field_kind kind;
    size_t offset;
} sampling_field;

#define FIELD(member, kind) {#member, kind, offsetof(sampling_params, member)}
static const sampling_field SAMPLING_FIELDS[] = {
    FIELD(max_tokens, FIELD_INT64),
    FIELD(temperature, FIELD_DOUBLE),
    FIELD(top_p, FIELD_DOUBLE),
    FIELD(top_k, FIELD_INT32),
    FIELD(min_p, FIELD_DOUBLE),
    FIELD(repeat_penalty, FIELD_DOUBLE),
    FIELD(seed, FIELD_UINT32),
    FIELD(presence_penalty, FIELD_DOUBLE),
    FIELD(frequency_penalty, FIELD_DOUBLE),
    FIELD(logprobs, FIELD_OPTIONAL_INT32),
};
#undef FIELD
#define N_SAMPLING_FIELDS (sizeof(SAMPLING_FIELDS) / sizeof(SAMPLING_FIELDS[0]))
static const char STOP_FIELD[] = "stop";

/* A str as an owned NUL-terminated UTF-8 copy; what names it in errors. */
static char *
text_from_python(PyObject *text, const char *what)
{
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "%s must be str", what);
        return NULL;
    }
    Py_ssize_t len;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &len);
    if (utf8 == NULL) {
        return NULL;
    }
    if ((Py_ssize_t)strlen(utf8) != len) {
        PyErr_Format(PyExc_ValueError, "%s must not contain NUL", what);
        return NULL;
    }
    char *copy = PyMem_RawMalloc((size_t)len + 1);
    if (copy == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(copy, utf8, (size_t)len + 1);
    return copy;
}

static int
trigger_patterns_from_python(PyObject *seq, grammar_spec *g)
{
    PyObject *fast = PySequence_Fast(seq, "trigger_patterns must be a sequence of str");
    if (fast == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    g->trigger_patterns = PyMem_RawCalloc((size_t)n + 1, sizeof(char *));
    if (g->trigger_patterns == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        char *pattern = text_from_python(PySequence_Fast_GET_ITEM(fast, i), "a trigger pattern");
        if (pattern == NULL) {
            Py_DECREF(fast);
            return -1; /* grammar_spec_free releases the ones made */
        }
        g->trigger_patterns[g->n_trigger_patterns++] = pattern;
    }
    Py_DECREF(fast);
    return 0;
}

static int
trigger_tokens_from_python(PyObject *seq, grammar_spec *g)
{
    int32_t n = 0;
    if (PySequence_Length(seq) == 0) {
        return PyErr_Occurred() ? -1 : 0;
    }
    g->trigger_tokens = prompt_from_python(seq, &n);
    if (g->trigger_tokens == NULL) {
        return -1;
    }
    g->n_trigger_tokens = (size_t)n;
    return 0;
}

/* The grammar and its triggers (modeld.types.GrammarConstraint, field by field); the
 * spec's text stays NULL for None. */
static int
grammar_from_python(PyObject *grammar, PyObject *patterns, PyObject *tokens, int full_pass,
                    grammar_spec *out)
{
    out->full_pass = full_pass != 0;
    if (grammar == NULL || grammar == Py_None) {
        return 0;
    }
    out->text = text_from_python(grammar, "grammar");
    if (out->text == NULL) {
        return -1;
    }
    if (patterns != NULL && trigger_patterns_from_python(patterns, out) < 0) {
        return -1;
    }
    if (tokens != NULL && trigger_tokens_from_python(tokens, out) < 0) {
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* Module state */

typedef struct {
    PyTypeObject *ring_type;
    PyTypeObject *assembler_type;
    /* The field names as interned str, made once: a name made per call would be kept
     * alive by CPython's attribute cache, which is keyed by the name's address. */
    PyObject *field_names[N_SAMPLING_FIELDS];
    PyObject *stop_name;
} module_state;

static module_state *
get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

static int
field_out_of_range(const sampling_field *field)
{
    PyErr_Format(PyExc_OverflowError, "sampling parameter %s is out of range", field->name);
    return -1;
}

static int
field_from_python(PyObject *value, const sampling_field *field, sampling_params *out)
{
    char *member = (char *)out + field->offset;
    switch (field->kind) {
    case FIELD_DOUBLE: {
        double v = PyFloat_AsDouble(value);
        if (v == -1.0 && PyErr_Occurred()) {
            return -1;
        }
        *(double *)member = v;
        return 0;
    }
    case FIELD_INT64: {
        long long v = PyLong_AsLongLong(value);
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        *(int64_t *)member = (int64_t)v;
        return 0;
    }
    case FIELD_OPTIONAL_INT32:
        if (value == Py_None) {
            *(int32_t *)member = -1;
            return 0;
        }
        __attribute__((fallthrough)); /* an int, which must not be negative */
    case FIELD_INT32: {
        long long v = PyLong_AsLongLong(value);
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (v < (field->kind == FIELD_OPTIONAL_INT32 ? 0 : INT32_MIN) || v > INT32_MAX) {
            return field_out_of_range(field);
        }
        *(int32_t *)member = (int32_t)v;
        return 0;
    }
    case FIELD_UINT32: {
        long long v = PyLong_AsLongLong(value);
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (v < 0 || v > UINT32_MAX) {
            return field_out_of_range(field);
        }
        *(uint32_t *)member = (uint32_t)v;
        return 0;
    }
    }
    PyErr_Format(PyExc_SystemError, "unknown kind of sampling parameter %s", field->name);
    return -1;
}

/* Read every sampling parameter of `params` by name (stops into `stops`). */
static int
sampling_from_python(const module_state *st, PyObject *params, sampling_params *out,
                     stop_set *stops)
{
    for (size_t i = 0; i < N_SAMPLING_FIELDS; i++) {
        PyObject *value = PyObject_GetAttr(params, st->field_names[i]);
        if (value == NULL) {
            return -1;
        }
        int status = field_from_python(value, &SAMPLING_FIELDS[i], out);
        Py_DECREF(value);
        if (status < 0) {
            return -1;
        }
    }
    PyObject *stop = PyObject_GetAttr(params, st->stop_name);
    if (stop == NULL) {
        return -1;
    }
    int status = stop_set_from_python(stop, stops);
    Py_DECREF(stop);
    return status;
}

/* ------------------------------------------------------------------------------------ */
/* C -> Python conversions (with the GIL) */

static PyObject *
field_to_python(const sampling_field *field, const sampling_params *params)
{
    const char *member = (const char *)params + field->offset;
    switch (field->kind) {
    case FIELD_DOUBLE:
        return PyFloat_FromDouble(*(const double *)member);
    case FIELD_INT64:
        return PyLong_FromLongLong(*(const int64_t *)member);
    case FIELD_INT32:
        return PyLong_FromLong(*(const int32_t *)member);
    case FIELD_OPTIONAL_INT32:
        if (*(const int32_t *)member < 0) {
            Py_RETURN_NONE;
        }
        return PyLong_FromLong(*(const int32_t *)member);
    case FIELD_UINT32:
        return PyLong_FromUnsignedLong(*(const uint32_t *)member);
    }
    PyErr_Format(PyExc_SystemError, "unknown kind of sampling parameter %s", field->name);
    return NULL;
}

static PyObject *
stop_set_to_python(const stop_set *stops)
{
    PyObject *tuple = PyTuple_New((Py_ssize_t)stops->count);
    if (tuple == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < stops->count; i++) {
        PyObject *item = PyBytes_FromStringAndSize(stops->items[i], (Py_ssize_t)stops->lens[i]);
        if (item == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, (Py_ssize_t)i, item);
    }
    return tuple;
}

/* {name: value} of what the loop would run with: the sampling_as_read() test hook. */
static PyObject *
sampling_to_python(const sampling_params *params, const stop_set *stops)
{
    PyObject *dict = PyDict_New();
    if (dict == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < N_SAMPLING_FIELDS; i++) {
        PyObject *value = field_to_python(&SAMPLING_FIELDS[i], params);
        if (value == NULL || PyDict_SetItemString(dict, SAMPLING_FIELDS[i].name, value) < 0) {
            Py_XDECREF(value);
            Py_DECREF(dict);
            return NULL;
        }
        Py_DECREF(value);
    }
    PyObject *stop = stop_set_to_python(stops);
    if (stop == NULL || PyDict_SetItemString(dict, STOP_FIELD, stop) < 0) {
        Py_XDECREF(stop);
        Py_DECREF(dict);
        return NULL;
    }
    Py_DECREF(stop);
    return dict;
}

static PyObject *
trace_to_python(const loop_state *s)
{
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
    case LOOP_ERR_GRAMMAR:
        return PyUnicode_FromString("llama.cpp refused the grammar");
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
    return Py_BuildValue("(iLLLNNiL(LL))", (int)s->stop_code,
                         (long long)s->completion_tokens, (long long)(first - s->started_ns),
                         (long long)(s->ended_ns - first), error, trace,
                         (int)s->cached_tokens, (long long)s->n_kv,
                         (long long)s->fast_tokens, (long long)s->full_passes);
}

/* ------------------------------------------------------------------------------------ */
/* TokenRing (Python type) */

typedef struct {
    PyObject_HEAD
    ring_t ring;
    lp_queue logprobs; /* the loop's log probabilities, beside the text */
} TokenRingObject;

static PyObject *
TokenRing_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
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
    if (!lp_queue_init(&self->logprobs)) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    switch (ring_init(&self->ring, (uint64_t)capacity)) {
    case RING_INIT_OK:
        return (PyObject *)self;
    case RING_INIT_NO_MEMORY:
        PyErr_NoMemory();
        break;
    case RING_INIT_ERRNO:
        PyErr_SetFromErrno(PyExc_OSError);
        break;
    }
    Py_DECREF(self);
    return NULL;
}

static void
TokenRing_dealloc(TokenRingObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    ring_destroy(&self->ring);
    lp_queue_free(&self->logprobs);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static int
TokenRing_check_open(TokenRingObject *self)
{
    if (self->ring.wake_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the ring is closed");
        return -1;
    }
    return 0;
}

/* Claim the producer side; the ring is single-producer and this makes misuse loud. */
static int
TokenRing_claim_producer(TokenRingObject *self)
{
    if (TokenRing_check_open(self) < 0) {
        return -1;
    }
    if (!ring_claim_producer(&self->ring)) {
        PyErr_SetString(PyExc_RuntimeError, "the ring already has an active producer");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(TokenRing_fileno_doc,
             "fileno() -> int\n\nAn eventfd, readable once the ring turns non-empty or finishes.");

static PyObject *
TokenRing_fileno(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (TokenRing_check_open(self) < 0) {
        return NULL;
    }
    return PyLong_FromLong(self->ring.wake_fd);
}

PyDoc_STRVAR(TokenRing_drain_doc,
             "drain() -> (bytes, int, bool)\n\nTake everything available without blocking: "
             "(text, tokens, finished). Clears the wake-up descriptor and wakes a producer "
             "waiting for space.");

static PyObject *
TokenRing_drain(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (TokenRing_check_open(self) < 0) {
        return NULL;
    }
    ring_drain_job job = ring_drain_begin(&self->ring);
    PyObject *text = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)job.n);
    if (text == NULL) {
        ring_drain_abandon(&self->ring, &job);
        return NULL;
    }
    ring_drain_finish(&self->ring, &job, PyBytes_AS_STRING(text));
    return Py_BuildValue("(NKO)", text, (unsigned long long)job.tokens,
                         job.finished ? Py_True : Py_False);
}

/* One lp_item as (id, piece, logprob). */
static PyObject *
lp_item_to_python(const lp_record *r, int32_t i)
{
    const lp_item *item = &r->items[i];
    return Py_BuildValue("(iy#d)", (int)item->id, lp_record_bytes(r) + item->piece_at,
                         (Py_ssize_t)item->piece_len, (double)item->logprob);
}

/* A record as (id, piece, logprob, ((id, piece, logprob), ...)). */
static PyObject *
lp_record_to_python(const lp_record *r)
{
    PyObject *top = PyTuple_New(r->n_items - 1);
    if (top == NULL) {
        return NULL;
    }
    for (int32_t i = 1; i < r->n_items; i++) {
        PyObject *item = lp_item_to_python(r, i);
        if (item == NULL) {
            Py_DECREF(top);
            return NULL;
        }
        PyTuple_SET_ITEM(top, i - 1, item);
    }
    const lp_item *chosen = &r->items[0];
    return Py_BuildValue("(iy#dN)", (int)chosen->id, lp_record_bytes(r),
                         (Py_ssize_t)chosen->piece_len, (double)chosen->logprob, top);
}

PyDoc_STRVAR(TokenRing_drain_logprobs_doc,
             "drain_logprobs() -> list\n\nTake the log probabilities queued so far, one "
             "(id, piece, logprob, ((id, piece, logprob), ...)) per token, in order. A token "
             "whose text a drain() returned has its entry here.");

static PyObject *
TokenRing_drain_logprobs(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        return NULL;
    }
    lp_record *r;
    while ((r = lp_queue_pop(&self->logprobs)) != NULL) {
        PyObject *entry = lp_record_to_python(r);
        if (entry == NULL || PyList_Append(list, entry) < 0) {
            Py_XDECREF(entry);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(entry);
    }
    return list;
}

PyDoc_STRVAR(TokenRing_watch_finish_doc,
             "watch_finish() -> bool\n\nClear the wake-up descriptor without draining, so "
             "that until the next drain it turns readable only when the stream finishes "
             "(pushes stay quiet). True when it has already finished.");

static PyObject *
TokenRing_watch_finish(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (TokenRing_check_open(self) < 0) {
        return NULL;
    }
    return PyBool_FromLong(ring_watch_finish(&self->ring));
}

PyDoc_STRVAR(TokenRing_push_doc,
             "push(data, tokens) -> bool\n\nAppend data (made by `tokens` tokens); blocks, "
             "with the GIL released, while the ring is full. False once cancelled. Signal "
             "handlers run while it waits; if one raises, the rest of data is dropped.");

static PyObject *
TokenRing_push(TokenRingObject *self, PyObject *args)
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
    if (TokenRing_claim_producer(self) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    ring_t *r = &self->ring;
    push_job job = {data.buf, (size_t)data.len, (uint64_t)tokens, false};
    push_status status;
    if (ring_push_cannot_block(r, (size_t)data.len)) {
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
                ring_release_producer(r);
                PyBuffer_Release(&data);
                return NULL;
            }
        }
    }
    ring_release_producer(r);
    PyBuffer_Release(&data);
    return PyBool_FromLong(status == PUSH_DONE);
}

PyDoc_STRVAR(TokenRing_finish_doc,
             "finish() -> None\n\nMark the end of the stream and wake the consumer.");

static PyObject *
TokenRing_finish(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (TokenRing_check_open(self) < 0) {
        return NULL;
    }
    ring_finish(&self->ring);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(TokenRing_wake_at_start_doc,
             "wake_at_start() -> None\n\nConsumer side, before the run: the descriptor turns "
             "readable once when a loop starts on this ring (run() does so after releasing "
             "the GIL), as a push would.");

static PyObject *
TokenRing_wake_at_start(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    atomic_store(&self->ring.wake_at_start, 1);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(TokenRing_loop_started_doc,
             "loop_started() -> None\n\nProducer side: a loop starts on this ring; wakes "
             "the consumer once if it asked (wake_at_start). run() does this itself.");

static PyObject *
TokenRing_loop_started(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (TokenRing_check_open(self) < 0) {
        return NULL;
    }
    ring_loop_started(&self->ring);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(TokenRing_cancel_doc,
             "cancel() -> None\n\nAsk the producer to stop; wakes it if it waits for space. "
             "Any thread, idempotent.");

static PyObject *
TokenRing_cancel(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    ring_cancel(&self->ring);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(TokenRing_close_doc,
             "close() -> None\n\nRelease the descriptor. Raises RuntimeError while a producer "
             "still uses the ring. Idempotent.");

static PyObject *
TokenRing_close(TokenRingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->ring.wake_fd < 0) {
        Py_RETURN_NONE;
    }
    if (atomic_load(&self->ring.producer_busy)) {
        PyErr_SetString(PyExc_RuntimeError, "cannot close a ring while its producer runs");
        return NULL;
    }
    ring_close_fd(&self->ring);
    Py_RETURN_NONE;
}

static PyObject *
TokenRing_get_cancelled(TokenRingObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(ring_is_cancelled(&self->ring));
}

static PyObject *
TokenRing_get_capacity(TokenRingObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->ring.capacity);
}

static PyObject *
TokenRing_get_producer_waiting(TokenRingObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(atomic_load(&self->ring.producer_waiting));
}

static PyMethodDef TokenRing_methods[] = {
    {"fileno", (PyCFunction)TokenRing_fileno, METH_NOARGS, TokenRing_fileno_doc},
    {"drain", (PyCFunction)TokenRing_drain, METH_NOARGS, TokenRing_drain_doc},
    {"drain_logprobs", (PyCFunction)TokenRing_drain_logprobs, METH_NOARGS,
     TokenRing_drain_logprobs_doc},
    {"watch_finish", (PyCFunction)TokenRing_watch_finish, METH_NOARGS,
     TokenRing_watch_finish_doc},
    {"push", (PyCFunction)TokenRing_push, METH_VARARGS, TokenRing_push_doc},
    {"finish", (PyCFunction)TokenRing_finish, METH_NOARGS, TokenRing_finish_doc},
    {"cancel", (PyCFunction)TokenRing_cancel, METH_NOARGS, TokenRing_cancel_doc},
    {"wake_at_start", (PyCFunction)TokenRing_wake_at_start, METH_NOARGS,
     TokenRing_wake_at_start_doc},
    {"loop_started", (PyCFunction)TokenRing_loop_started, METH_NOARGS,
     TokenRing_loop_started_doc},
    {"close", (PyCFunction)TokenRing_close, METH_NOARGS, TokenRing_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef TokenRing_getset[] = {
    {"cancelled", (getter)TokenRing_get_cancelled, NULL, "True once cancel() was called.", NULL},
    {"capacity_bytes", (getter)TokenRing_get_capacity, NULL, "Bytes the ring holds at most.",
     NULL},
    {"producer_waiting", (getter)TokenRing_get_producer_waiting, NULL,
     "True while the producer sleeps for space (or a paused prompt waits for cancel).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(TokenRing_doc,
             "TokenRing(capacity_bytes=65536)\n\nBounded single-producer/single-consumer byte "
             "ring with a cancel flag and an eventfd; implements modeld.engine.base.TokenRing.");

static PyType_Slot TokenRing_slots[] = {
    {Py_tp_new, TokenRing_new},
    {Py_tp_dealloc, TokenRing_dealloc},
    {Py_tp_methods, TokenRing_methods},
    {Py_tp_getset, TokenRing_getset},
    {Py_tp_doc, (void *)TokenRing_doc},
    {0, NULL},
};

static PyType_Spec TokenRing_spec = {
    .name = "modeld.engine._tokenloop.TokenRing",
    .basicsize = sizeof(TokenRingObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = TokenRing_slots,
};

/* ------------------------------------------------------------------------------------ */
/* TextAssembler (Python type; lets tests compare the C rules with textstream's) */

typedef struct {
    PyObject_HEAD
    stop_set stops;
    text_asm text;
} AssemblerObject;

static PyObject *
Assembler_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
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
Assembler_dealloc(AssemblerObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    stop_set_free(&self->stops);
    text_asm_free(&self->text);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyObject *
Assembler_feed(AssemblerObject *self, PyObject *arg)
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
Assembler_flush(AssemblerObject *self, PyObject *Py_UNUSED(ignored))
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
Assembler_get_stopped(AssemblerObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->text.stopped);
}

static PyMethodDef Assembler_methods[] = {
    {"feed", (PyCFunction)Assembler_feed, METH_O,
     "feed(piece) -> bytes\n\nAdd one token's piece; return the bytes now safe to emit."},
    {"flush", (PyCFunction)Assembler_flush, METH_NOARGS,
     "flush() -> bytes\n\nThe held-back tail, unless a stop string was hit."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Assembler_getset[] = {
    {"stopped", (getter)Assembler_get_stopped, NULL, "True once a stop string completed.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Assembler_slots[] = {
    {Py_tp_new, Assembler_new},
    {Py_tp_dealloc, Assembler_dealloc},
    {Py_tp_methods, Assembler_methods},
    {Py_tp_getset, Assembler_getset},
    {Py_tp_doc, "TextAssembler(stops)\n\nThe C loop's text rules, exposed for tests."},
    {0, NULL},
};

static PyType_Spec Assembler_spec = {
    .name = "modeld.engine._tokenloop.TextAssembler",
    .basicsize = sizeof(AssemblerObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Assembler_slots,
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
    const char *missing = llama_api_resolve(handle, &resolved);
    if (missing != NULL) {
        PyErr_Format(PyExc_ImportError, "llama.cpp function %s not found in %s", missing, path);
        dlclose(handle);
        Py_DECREF(encoded);
        return NULL;
    }
    lib = resolved;
    lib_handle = handle; /* kept open for the life of the process, like llama_cpp's own */
    Py_DECREF(encoded);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(run_doc,
             "run(*, ring, ctx, vocab, prompt, n_batch, n_vocab, penalty_last_n, params, "
             "cached=0, n_swa=0, grammar=None, trigger_patterns=(), trigger_tokens=(), "
             "full_grammar_pass=False, pause_fd=-1)\n"
             "-> (stop_code, completion_tokens, prompt_eval_ns, eval_ns, error, token_ids, "
             "cached_tokens, n_kv, (fast_tokens, full_passes))\n\n"
             "One generation with the GIL released; every argument by name. ctx and vocab are "
             "addresses; params is a modeld.types.SamplingParams (its fields are read by name, "
             "seed and max_tokens must be set). cached: the KV holds prompt[:cached] from the "
             "previous generation (kept when that is exact, see keep_cached_prefix; else the "
             "cache is cleared); n_swa: the model's sliding window. grammar is GBNF text with a "
             "root rule, or None; with trigger patterns (regexes llama.cpp compiles, from "
             "trusted code only: a bad one aborts) or tokens it is lazy; full_grammar_pass: "
             "check every candidate at every step (the reference for the fast path, see "
             "csrc/sampling.h); fast_tokens/full_passes count the grammar's two paths. token_ids: every sampled id, an EOG included; cached_tokens: "
             "the prompt tokens kept; n_kv: the KV holds the first n_kv of prompt + token_ids, "
             "-1 when unknown. pause_fd >= 0 is a test hook: the first prompt decode signals it "
             "and holds until the ring is cancelled.");

static PyObject *
tokenloop_run(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"ring",     "ctx",    "vocab",          "prompt", "n_batch",
                               "n_vocab",  "penalty_last_n", "params", "cached", "n_swa",
                               "grammar",  "trigger_patterns", "trigger_tokens",
                               "full_grammar_pass", "pause_fd", NULL};
    module_state *st = get_state(module);
    PyObject *ring_obj = NULL, *prompt_obj = NULL, *params_obj = NULL, *grammar_obj = NULL;
    PyObject *patterns_obj = NULL, *trigger_tokens_obj = NULL;
    int full_pass = 0;
    unsigned long long ctx_addr = 0, vocab_addr = 0;
    loop_state s;
    memset(&s, 0, sizeof(s));
    s.penalty_last_n = INT_MIN; /* "not given": llama.cpp takes -1 and up */
    s.abort.pause_fd = -1;
    /* "|$": keyword-only, so two neighbours of one type can never be swapped by position */
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$O!KKOiiiOiiOOOpi:run", keywords,
                                     st->ring_type, &ring_obj, &ctx_addr, &vocab_addr,
                                     &prompt_obj, &s.n_batch, &s.n_vocab, &s.penalty_last_n,
                                     &params_obj, &s.n_cached, &s.n_swa, &grammar_obj,
                                     &patterns_obj, &trigger_tokens_obj, &full_pass,
                                     &s.abort.pause_fd)) {
        return NULL;
    }
    if (ring_obj == NULL || prompt_obj == NULL || params_obj == NULL ||
        s.penalty_last_n == INT_MIN) {
        PyErr_SetString(PyExc_TypeError,
                        "run() needs ring, ctx, vocab, prompt, n_batch, n_vocab, "
                        "penalty_last_n and params, each by name");
        return NULL;
    }
    if (lib_handle == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() the llama.cpp library before run()");
        return NULL;
    }
    if (ctx_addr == 0 || vocab_addr == 0 || s.n_batch < 1 || s.n_vocab < 1) {
        PyErr_SetString(PyExc_ValueError, "null context/vocab, or n_batch/n_vocab < 1");
        return NULL;
    }
    TokenRingObject *ring = (TokenRingObject *)ring_obj;
    s.ring = &ring->ring;
    s.logprobs = &ring->logprobs;
    s.ctx = (struct llama_context *)(uintptr_t)ctx_addr;
    s.vocab = (const struct llama_vocab *)(uintptr_t)vocab_addr;
    PyObject *result = NULL;
    if (sampling_from_python(st, params_obj, &s.sampling, &s.stops) < 0) {
        goto done;
    }
    if (s.sampling.logprobs > LP_MAX_TOP) {
        PyErr_Format(PyExc_ValueError, "logprobs must be at most %d", LP_MAX_TOP);
        goto done;
    }
    if (s.sampling.max_tokens < 1) {
        PyErr_SetString(PyExc_ValueError, "max_tokens must be at least 1");
        goto done;
    }
    if (grammar_from_python(grammar_obj, patterns_obj, trigger_tokens_obj, full_pass,
                            &s.grammar) < 0) {
        goto done;
    }
    s.prompt = prompt_from_python(prompt_obj, &s.n_prompt);
    if (s.prompt == NULL) {
        goto done;
    }
    if (s.n_cached < 0 || s.n_cached >= s.n_prompt || s.n_swa < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "cached must leave at least one prompt token to evaluate; n_swa >= 0");
        goto done;
    }
    if (!loop_enable_trace(&s)) {
        PyErr_NoMemory();
        goto done;
    }
    if (TokenRing_claim_producer(ring) < 0) {
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    /* The consumer (the event loop) wakes while this thread needs no GIL. Woken by this
     * thread, it is often queued on this core, where it would wait for the loop's time
     * slice (1-2 ms measured: a 100-token stream's first byte came that much later than
     * a 1-token one's); yielding once lets it run first. On another core, a no-op. */
    if (ring_loop_started(s.ring)) {
        sched_yield();
    }
    run_loop(&s);
    Py_END_ALLOW_THREADS
    ring_release_producer(s.ring);
    result = outcome_to_python(&s);
done:
    loop_state_release(&s);
    return result;
}

PyDoc_STRVAR(sampling_as_read_doc,
             "sampling_as_read(params) -> dict\n\nThe sampling parameters as run() reads them "
             "from params, by field name (stop strings as bytes): a test hook that shows "
             "every field reaches the member of its own name.");

static PyObject *
tokenloop_sampling_as_read(PyObject *module, PyObject *params)
{
    sampling_params read;
    stop_set stops = {0};
    memset(&read, 0, sizeof(read));
    PyObject *result = NULL;
    if (sampling_from_python(get_state(module), params, &read, &stops) == 0) {
        result = sampling_to_python(&read, &stops);
    }
    stop_set_free(&stops);
    return result;
}

static PyMethodDef tokenloop_methods[] = {
    {"bind", (PyCFunction)tokenloop_bind, METH_O, bind_doc},
    {"run", (PyCFunction)(void (*)(void))tokenloop_run, METH_VARARGS | METH_KEYWORDS, run_doc},
    {"sampling_as_read", (PyCFunction)tokenloop_sampling_as_read, METH_O, sampling_as_read_doc},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------------------------------ */
/* Module */

static int
tokenloop_exec(PyObject *module)
{
    module_state *st = get_state(module);
    st->ring_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &TokenRing_spec, NULL);
    if (st->ring_type == NULL || PyModule_AddType(module, st->ring_type) < 0) {
        return -1;
    }
    st->assembler_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &Assembler_spec, NULL);
    if (st->assembler_type == NULL || PyModule_AddType(module, st->assembler_type) < 0) {
        return -1;
    }
    for (size_t i = 0; i < N_SAMPLING_FIELDS; i++) {
        st->field_names[i] = PyUnicode_InternFromString(SAMPLING_FIELDS[i].name);
        if (st->field_names[i] == NULL) {
            return -1;
        }
    }
    st->stop_name = PyUnicode_InternFromString(STOP_FIELD);
    return st->stop_name == NULL ? -1 : 0;
}

static int
tokenloop_traverse(PyObject *module, visitproc visit, void *arg)
{
    module_state *st = get_state(module);
    Py_VISIT(st->ring_type);
    Py_VISIT(st->assembler_type);
    for (size_t i = 0; i < N_SAMPLING_FIELDS; i++) {
        Py_VISIT(st->field_names[i]);
    }
    Py_VISIT(st->stop_name);
    return 0;
}

static int
tokenloop_clear(PyObject *module)
{
    module_state *st = get_state(module);
    Py_CLEAR(st->ring_type);
    Py_CLEAR(st->assembler_type);
    for (size_t i = 0; i < N_SAMPLING_FIELDS; i++) {
        Py_CLEAR(st->field_names[i]);
    }
    Py_CLEAR(st->stop_name);
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
             "modeld's C token loop: TokenRing, TextAssembler, bind(), run() and the "
             "sampling_as_read() test hook. Use it through modeld.engine.cloop.CTokenLoop.");

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
