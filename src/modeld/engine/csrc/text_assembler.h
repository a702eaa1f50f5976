/*
 * Text assembly, the C twin of modeld.engine.textstream.TextAssembler: holds back an
 * unfinished UTF-8 character and any prefix of a stop string, and cuts the text just
 * before the first stop string that completes.
 */
#ifndef MODELD_TEXT_ASSEMBLER_H
#define MODELD_TEXT_ASSEMBLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "alloc.h"

/* The stop strings of one generation, as owned byte copies; empty ones are never added. */
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

/* Room for `capacity` strings; false when out of memory (stop_set_free then cleans up). */
static bool
stop_set_init(stop_set *stops, size_t capacity)
{
    size_t slots = capacity ? capacity : 1;
    stops->items = MODELD_CALLOC(slots, sizeof(char *));
    stops->lens = MODELD_CALLOC(slots, sizeof(size_t));
    stops->count = 0;
    return stops->items != NULL && stops->lens != NULL;
}

/* Copy one stop string in (the caller keeps within the capacity given to init); an
 * empty one is skipped. False when out of memory. */
static bool
stop_set_add(stop_set *stops, const char *bytes, size_t len)
{
    if (len == 0) {
        return true;
    }
    char *copy = MODELD_MALLOC(len);
    if (copy == NULL) {
        return false;
    }
    memcpy(copy, bytes, len);
    stops->items[stops->count] = copy;
    stops->lens[stops->count] = len;
    stops->count++;
    return true;
}

static void
stop_set_free(stop_set *stops)
{
    for (size_t i = 0; i < stops->count; i++) {
        MODELD_FREE(stops->items[i]);
    }
    MODELD_FREE(stops->items);
    MODELD_FREE(stops->lens);
    stops->items = NULL;
    stops->lens = NULL;
    stops->count = 0;
}

/* Offset of the first `needle` (m >= 1 bytes) in `hay`, or SIZE_MAX: memmem, which is
 * a GNU extension. */
static size_t
find_bytes(const char *hay, size_t n, const char *needle, size_t m)
{
    for (size_t at = 0; at + m <= n; at++) {
        const char *hit = memchr(hay + at, needle[0], n - m + 1 - at);
        if (hit == NULL) {
            return SIZE_MAX;
        }
        at = (size_t)(hit - hay);
        if (memcmp(hit, needle, m) == 0) {
            return at;
        }
    }
    return SIZE_MAX;
}

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
    char *grown = MODELD_REALLOC(t->pending, cap);
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
        size_t at = find_bytes(t->pending, t->len, t->stops->items[i], t->stops->lens[i]);
        if (at < cut) {
            cut = at;
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
text_asm_free(text_asm *t)
{
    MODELD_FREE(t->pending);
    t->pending = NULL;
    t->len = t->cap = 0;
}

#endif /* MODELD_TEXT_ASSEMBLER_H */
