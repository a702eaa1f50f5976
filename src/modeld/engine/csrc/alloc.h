/*
 * Where the pure-C parts of the token loop get their memory.
 *
 * _tokenloop.c defines these to PyMem_Raw* before it includes any header here, so that
 * tracemalloc sees every allocation (tests/engine/test_token_loop_leaks.py); compiled on
 * their own, the headers use libc's. Both are safe to call without the GIL.
 */
#ifndef MODELD_ALLOC_H
#define MODELD_ALLOC_H

#ifndef MODELD_MALLOC
#include <stdlib.h>
#define MODELD_MALLOC malloc
#define MODELD_CALLOC calloc
#define MODELD_REALLOC realloc
#define MODELD_FREE free
#endif

#endif /* MODELD_ALLOC_H */
