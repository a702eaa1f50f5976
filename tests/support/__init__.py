"""Helpers shared by the tests and the benchmarks (not shipped with modeld).

``server``: a real ``modeld serve`` subprocess on 127.0.0.1 and a free port.
``tiny_gguf``: small random-weight GGUF models that real llama.cpp loads.
"""
