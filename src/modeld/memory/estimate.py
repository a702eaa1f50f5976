"""How much memory an instance will need, from its GGUF header alone.

The estimate follows how llama.cpp (as vendored by llama-cpp-python 0.3.36) sizes its
buffers, on the device being budgeted: RAM when ``gpu=False``, VRAM when ``gpu=True``.

``weights_bytes``
    On CPU: every tensor (``header.total_weight_bytes``; mmapped pages become resident
    as they are used) plus the copies ggml-cpu makes of ``blk.*`` tensors it repacks for
    SIMD (Q4_0, Q4_K, IQ4_NL; an allowance: CPUs without repack support use less).
    On GPU: llama.cpp offloads the *last* ``n_gpu_layers`` of the ``block_count + 1``
    layers, the extra one being the output layer (``output*``, plus a duplicate of
    ``token_embd`` when embeddings are tied); the input embeddings stay on the CPU.
    ``n_gpu_layers < 0`` means all of them.

``kv_cache_bytes``
    One f16 K and one f16 V row per cell and layer, on the layers on this device:
    ``cells * n_head_kv[layer] * (key_length + value_length) * 2``, summed, with
    ``cells = n_ctx`` rounded up to a multiple of 256 (llama.cpp pads it).
    Sliding-window layers count in full: llama-cpp-python 0.3.36 asks for a full-size
    SWA cache by default.

``compute_bytes``
    ggml reuses memory between ops, so the graph buffer is the largest of three phases
    for a ubatch of ``n_ubatch`` tokens, as :func:`modeld.types.context_sizes` sets it for
    the engine (f32 activations,
    ``q_width = max(n_embd, n_head * key_length)``)::

        attention = n_ubatch * cells * (n_head + 1) * 4      # KQ scores + mask
                  + n_ubatch * 7 * q_width * 4
        ffn       = n_ubatch * (3 * n_ff + 7 * q_width) * 4
        logits    = n_outputs * n_vocab * 4 + n_ubatch * 2 * n_embd * 4

    plus the f16 copy of the attention weights that the KQ*V product converts into
    (``n_ubatch * cells * n_head * 2``, ggml-cpu's work buffer or CUDA's pool), the
    output buffer (``n_vocab * 4``) and 2 MiB of graph overhead. ``n_outputs`` is
    ``n_ubatch`` on GPU, where the whole reserved buffer is committed VRAM, and 1 on CPU,
    where the buffer is ``malloc``-ed and only the pages a graph writes become resident
    (modeld needs the last token's logits only). Calibrated on CPU against llama.cpp's
    "compute buffer size" log lines: exact within 0.5% where one phase dominates, up to
    10% over where two are close. Flash attention (off by default) needs less; an MoE
    FFN is sized as dense.

``overhead_bytes``
    On CPU: 4 MiB per instance plus 192 bytes per vocabulary entry (llama.cpp's token
    tables, host memory), measured on the tiny models and Gemma. On GPU: 100 MiB per
    instance of device memory outside llama.cpp's buffers, allocated by the first long
    prompt (a cuBLAS handle and its workspace, and what ggml-cuda's pool holds beyond the
    KQ copy above). Measured on an H200 (CUDA 13.0, llama-cpp-python 0.3.36, f16 llamas
    of 0.1 to 1.6 GiB, n_ctx 512 to 4096): 89 to 99 MiB over buffers + KQ copy.

Not included: llama-cpp-python's ``scores`` array (``n_batch * n_vocab`` floats of
address space that is never written without ``logits_all``), and on GPU what the
*process* holds once whatever is loaded (the CUDA context and kernels, 586 MiB on that
H200): the scheduler measures and charges that separately. After a load, a larger
measured size replaces this estimate (see :mod:`modeld.memory.probe`).
"""

from __future__ import annotations

from dataclasses import dataclass

from modeld.gguf import GgufHeader
from modeld.sizes import MIB
from modeld.types import context_sizes

__all__ = [
    "FootprintEstimate",
    "compute_buffer_bytes",
    "embedding_context_bytes",
    "estimate_footprint",
    "graph_buffer_bytes",
    "repacked_weight_bytes",
]

KV_CELL_PADDING = 256
_F16_BYTES = 2
_F32_BYTES = 4
_GRAPH_OVERHEAD_BYTES = 2 * MIB
_INSTANCE_OVERHEAD_BYTES = 4 * MIB
_CUDA_INSTANCE_OVERHEAD_BYTES = 100 * MIB
_VOCAB_ENTRY_BYTES = 192
_REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})


@dataclass(frozen=True, slots=True)
class FootprintEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    overhead_bytes: int
    kv_cells: int
    n_ubatch_tokens: int
    gpu_layers: int  # layers (of block_count + 1) on the budgeted device; 0 on CPU

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def total_mb(self) -> float:
        """The total in MiB (2^20 bytes), the unit of ``--vram-budget-mb``."""
        return self.total_bytes / MIB


def estimate_footprint(
    header: GgufHeader,
    *,
    n_ctx: int,
    n_gpu_layers: int,
    n_batch: int = 512,
    gpu: bool,
) -> FootprintEstimate:
    """Estimate the bytes an instance of ``header`` takes on the budgeted device.

    ``gpu=False`` budgets RAM (everything counts); ``gpu=True`` budgets VRAM (only what
    ``n_gpu_layers`` puts there, plus the compute buffers). Raises ValueError when
    ``n_ctx`` or ``n_batch`` is not positive: the caller bounds ``n_ctx`` by the model's
    context length first and never passes 0 ("the model's own"), which a header could
    make arbitrarily large.
    """
    if n_ctx < 1 or n_batch < 1:
        raise ValueError("n_ctx and n_batch must be positive")
    n_layer = header.block_count
    sizes = context_sizes(n_ctx, n_batch)  # the engine's own rule
    kv_cells = -(-sizes.n_ctx // KV_CELL_PADDING) * KV_CELL_PADDING
    n_ubatch = sizes.n_ubatch
    kv_row_bytes = (header.key_length + header.value_length) * _F16_BYTES
    kv_per_layer = [kv_cells * n_kv * kv_row_bytes for n_kv in header.head_count_kv_per_layer]
    if gpu:
        offloaded = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
        first_gpu_layer = n_layer + 1 - offloaded
        weights = sum(header.layer_weight_bytes[first_gpu_layer:])
        weights += header.output_weight_bytes if offloaded else 0
        kv = sum(kv_per_layer[first_gpu_layer:])
        overhead = _CUDA_INSTANCE_OVERHEAD_BYTES if offloaded else 0
    else:
        offloaded = 0
        weights = header.total_weight_bytes + repacked_weight_bytes(header)
        kv = sum(kv_per_layer)
        overhead = _INSTANCE_OVERHEAD_BYTES + header.n_vocab * _VOCAB_ENTRY_BYTES
    compute = compute_buffer_bytes(
        header, kv_cells=kv_cells, n_ubatch=n_ubatch, n_outputs=n_ubatch if gpu else 1
    )
    return FootprintEstimate(
        weights_bytes=weights,
        kv_cache_bytes=kv,
        compute_bytes=compute,
        overhead_bytes=overhead,
        kv_cells=kv_cells,
        n_ubatch_tokens=n_ubatch,
        gpu_layers=offloaded,
    )


def embedding_context_bytes(
    header: GgufHeader, *, n_tokens: int, n_gpu_layers: int, gpu: bool
) -> int:
    """A second context on the loaded weights, for embeddings of up to ``n_tokens``.

    No weights: it shares them. Its KV cache and compute buffer as for a generation
    context of ``n_tokens``, except that every token is an output (llama.cpp computes the
    logits of every token of a pooled embedding), on CPU as on GPU; plus the output
    buffer holding those logits and embeddings.
    """
    base = estimate_footprint(
        header, n_ctx=n_tokens, n_gpu_layers=n_gpu_layers, n_batch=n_tokens, gpu=gpu
    )
    n_ubatch = base.n_ubatch_tokens
    compute = compute_buffer_bytes(
        header, kv_cells=base.kv_cells, n_ubatch=n_ubatch, n_outputs=n_ubatch
    )
    outputs = n_ubatch * (header.n_vocab + header.embedding_length) * _F32_BYTES
    return base.kv_cache_bytes + compute + outputs


def repacked_weight_bytes(header: GgufHeader) -> int:
    """Bytes of the layer tensors ggml-cpu may copy into a SIMD-friendly layout."""
    return sum(
        tensor.nbytes
        for tensor in header.tensors
        if tensor.ggml_type_name in _REPACKED_TYPES and tensor.name.startswith("blk.")
    )


def compute_buffer_bytes(
    header: GgufHeader, *, kv_cells: int, n_ubatch: int, n_outputs: int
) -> int:
    """Graph buffer, attention work buffer and output buffer (module docstring)."""
    graph_bytes = graph_buffer_bytes(
        header, kv_cells=kv_cells, n_ubatch=n_ubatch, n_outputs=n_outputs
    )
    work_bytes = n_ubatch * kv_cells * header.head_count * _F16_BYTES
    output_bytes = header.n_vocab * _F32_BYTES
    return graph_bytes + work_bytes + output_bytes + _GRAPH_OVERHEAD_BYTES


def graph_buffer_bytes(header: GgufHeader, *, kv_cells: int, n_ubatch: int, n_outputs: int) -> int:
    """The largest phase of the graph: what llama.cpp logs as "compute buffer size"."""
    n_embd, n_head = header.embedding_length, header.head_count
    q_width = max(n_embd, n_head * header.key_length)
    attention = n_ubatch * kv_cells * (n_head + 1) + n_ubatch * 7 * q_width
    ffn = n_ubatch * (3 * header.feed_forward_length + 7 * q_width)
    logits = n_outputs * header.n_vocab + n_ubatch * 2 * n_embd
    return max(attention, ffn, logits) * _F32_BYTES
