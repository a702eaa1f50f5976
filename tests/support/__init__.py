"""Helpers shared by the tests and the benchmarks (not shipped with modeld): the one
place a test looks for a server, a model, a client or a wait.

``poll``: the one poller (bounded by time, never by a count of tries).
``server``: a real ``modeld serve`` subprocess on 127.0.0.1 and a free port.
``http``: raw HTTP exchanges with it, the Gemma name and flags, ``link_or_copy``.
``openai_clients``: ``openai`` clients of a server, closed when the session ends.
``operator``: log and audit lines of a server; an app served in-process on Hypercorn.
``engine``: driving a token loop directly (rings, outcomes).
``tiny_gguf``, ``tiny_gemma3``, ``hostile_models``, ``gguf_bytes``: GGUF files that real
llama.cpp loads (or must refuse). The real Gemma is the ``gemma_path``/``gemma_dir``
fixtures of ``tests/conftest.py``.
"""
