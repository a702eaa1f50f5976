"""The footprint estimate: arithmetic, then calibration against what llama.cpp allocates
and what a real load adds to this process's RSS (measured in a fresh subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from modeld.gguf import GgufHeader, read_gguf_header
from modeld.memory.estimate import (
    FootprintEstimate,
    estimate_footprint,
    graph_buffer_bytes,
    repacked_weight_bytes,
)
from modeld.sizes import MIB
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

# A tiny model large enough that RSS differences are well above noise.
MID_SPEC = TinyModelSpec(
    n_embd=512, n_layer=8, n_head=8, n_head_kv=2, n_ff=2048, context_length=4096
)


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory: pytest.TempPathFactory) -> GgufHeader:
    return read_gguf_header(write_tiny_gguf(tmp_path_factory.mktemp("mid") / "mid.gguf", MID_SPEC))


@pytest.fixture(scope="module")
def tiny_header(tiny_model_path: Path) -> GgufHeader:
    return read_gguf_header(tiny_model_path)


# --- arithmetic ----------------------------------------------------------------------------


def test_cpu_counts_every_weight_and_every_layer(tiny_header: GgufHeader) -> None:
    estimate = estimate_footprint(tiny_header, n_ctx=512, n_gpu_layers=0, gpu=False)
    assert estimate.weights_bytes == tiny_header.total_weight_bytes  # F32: nothing repacked
    # 2 layers * 512 cells * 4 kv heads * (16 + 16) dims * 2 bytes
    assert estimate.kv_cache_bytes == 2 * 512 * 4 * 32 * 2
    assert estimate.gpu_layers == 0
    assert estimate.total_bytes == (
        estimate.weights_bytes
        + estimate.kv_cache_bytes
        + estimate.compute_bytes
        + estimate.overhead_bytes
    )
    assert estimate.total_mb == estimate.total_bytes / MIB


def test_gpu_offload_takes_the_last_layers_then_the_output(mid_model: GgufHeader) -> None:
    n_layer = mid_model.block_count
    layers, output = mid_model.layer_weight_bytes, mid_model.output_weight_bytes
    kv_layer_bytes = 4096 * 2 * 64 * 2 * 2  # cells * n_head_kv * (k + v dims) * f16

    def on_gpu(n_gpu_layers: int) -> FootprintEstimate:
        return estimate_footprint(mid_model, n_ctx=4096, n_gpu_layers=n_gpu_layers, gpu=True)

    assert (on_gpu(0).weights_bytes, on_gpu(0).kv_cache_bytes) == (0, 0)
    assert (on_gpu(1).weights_bytes, on_gpu(1).kv_cache_bytes) == (output, 0)
    three = on_gpu(3)
    assert three.weights_bytes == sum(layers[n_layer - 2 :]) + output
    assert three.kv_cache_bytes == 2 * kv_layer_bytes
    for everything in (on_gpu(n_layer + 1), on_gpu(999), on_gpu(-1)):
        assert everything.weights_bytes == sum(layers) + output
        assert everything.kv_cache_bytes == n_layer * kv_layer_bytes
        assert everything.gpu_layers == n_layer + 1
        # not the host's token tables: the device memory cuBLAS and ggml-cuda's pool take
        assert everything.overhead_bytes == 100 * MIB
    assert on_gpu(0).overhead_bytes == 0  # nothing offloaded, no CUDA work per instance
    # the input embeddings never leave the CPU
    assert on_gpu(-1).weights_bytes == mid_model.total_weight_bytes - mid_model.input_weight_bytes


def test_tied_embeddings_are_duplicated_onto_the_gpu(gemma_path: Path) -> None:
    header = read_gguf_header(gemma_path)
    embeddings = next(t.nbytes for t in header.tensors if t.name == "token_embd.weight")
    full = estimate_footprint(header, n_ctx=2048, n_gpu_layers=-1, gpu=True)
    assert full.weights_bytes == sum(header.layer_weight_bytes) + header.output_weight_bytes
    assert header.output_weight_bytes > embeddings
    cpu = estimate_footprint(header, n_ctx=2048, n_gpu_layers=0, gpu=False)
    assert cpu.weights_bytes == header.total_weight_bytes + repacked_weight_bytes(header)


def test_context_is_padded_and_the_ubatch_bounded(tiny_header: GgufHeader) -> None:
    estimate = estimate_footprint(tiny_header, n_ctx=300, n_gpu_layers=0, n_batch=2048, gpu=False)
    assert (estimate.kv_cells, estimate.n_ubatch_tokens) == (512, 300)
    estimate = estimate_footprint(tiny_header, n_ctx=512, n_gpu_layers=0, n_batch=2048, gpu=False)
    assert estimate.n_ubatch_tokens == 512
    smaller = estimate_footprint(tiny_header, n_ctx=256, n_gpu_layers=0, gpu=False)
    assert smaller.total_bytes < estimate.total_bytes


def test_gpu_reserves_the_whole_logits_phase(gemma_path: Path) -> None:
    header = read_gguf_header(gemma_path)
    gpu = estimate_footprint(header, n_ctx=2048, n_gpu_layers=-1, gpu=True)
    cpu = estimate_footprint(header, n_ctx=2048, n_gpu_layers=0, gpu=False)
    assert gpu.compute_bytes - cpu.compute_bytes > 400 * MIB  # 512 rows of 262144 logits


@pytest.mark.parametrize(("n_ctx", "n_batch"), [(0, 512), (512, 0), (-1, 1)])
def test_nonsense_sizes_are_refused(tiny_header: GgufHeader, n_ctx: int, n_batch: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        estimate_footprint(tiny_header, n_ctx=n_ctx, n_gpu_layers=0, n_batch=n_batch, gpu=False)


# --- calibration against real loads ----------------------------------------------------------

# The CPU estimate is calibrated against a CPU build. A CUDA build puts the compute buffer
# on the GPU even with n_gpu_layers=0 (llama.cpp offloads large batches' operations): there
# is no "CPU compute buffer" to compare with. The GPU estimate's calibration is
# benchmarks/gpu/budget_check.py (docs/benchmarks.md, "GPU").
cpu_build_only = pytest.mark.skipif(
    bool(llama_cpp.llama_supports_gpu_offload()),
    reason="calibrates the CPU estimate; this llama.cpp build offloads to a GPU",
)

_MEASURE = textwrap.dedent(
    """
    import ctypes, gc, json, re, sys
    import llama_cpp
    from modeld.memory.probe import RssProbe

    path, n_ctx, n_batch, cycles = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    logs = []

    @llama_cpp.llama_log_callback
    def on_log(level, text, user_data):
        logs.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    probe = RssProbe(trim=True)
    gc.collect()
    baseline = probe.used_bytes()
    result = {"after_close_bytes": []}
    for cycle in range(cycles):
        logs.clear()
        llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_batch, verbose=True)
        loaded = probe.used_bytes()
        llm.eval([1] + [3 + i % 200 for i in range(n_ctx - 9)])  # fill the context
        filled = probe.used_bytes()
        text = "".join(logs)
        if cycle == 0:
            def mib(pattern, first_only=False):
                values = [float(v) for v in re.findall(pattern + r"\\s*=\\s*([\\d.]+) MiB", text)]
                return sum(values[:1] if first_only else values)
            result.update(
                model_mib=mib("CPU_Mapped model buffer size"),
                repack_mib=mib("CPU_REPACK model buffer size"),
                kv_mib=mib("KV buffer size"),
                compute_mib=mib("CPU compute buffer size", first_only=True),
                n_ctx=llm.n_ctx(),
                load_growth_bytes=loaded - baseline,
                filled_growth_bytes=filled - baseline,
            )
        llm.close()
        del llm
        gc.collect()
        result["after_close_bytes"].append(probe.used_bytes() - baseline)
    print(json.dumps(result))
    """
)


def measure(path: Path, *, n_ctx: int, n_batch: int, cycles: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    completed = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), str(n_ctx), str(n_batch), str(cycles)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    measured: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return measured


def check_against_llama_cpp(header: GgufHeader, *, n_ctx: int, n_batch: int, cycles: int) -> None:
    """Each part of the estimate against llama.cpp's own buffer sizes, then the total
    against the RSS growth of a load whose context was filled (so the compute buffer was
    used), then RSS after close() over repeated cycles."""
    measured = measure(header.path, n_ctx=n_ctx, n_batch=n_batch, cycles=cycles)
    estimate = estimate_footprint(header, n_ctx=n_ctx, n_gpu_layers=0, n_batch=n_batch, gpu=False)
    assert measured["n_ctx"] == estimate.kv_cells
    assert estimate.kv_cache_bytes / MIB == pytest.approx(measured["kv_mib"], abs=0.01)
    assert header.total_weight_bytes / MIB == pytest.approx(measured["model_mib"], abs=0.01)
    assert repacked_weight_bytes(header) / MIB >= float(measured["repack_mib"]) - 0.01
    reserved_graph_bytes = graph_buffer_bytes(
        header,
        kv_cells=estimate.kv_cells,
        n_ubatch=estimate.n_ubatch_tokens,
        n_outputs=estimate.n_ubatch_tokens,
    )
    graph_ratio = reserved_graph_bytes / MIB / float(measured["compute_mib"])
    assert 0.99 <= graph_ratio <= 1.12, graph_ratio
    filled = int(measured["filled_growth_bytes"])
    assert 0.85 <= filled / estimate.total_bytes <= 1.10, (filled / MIB, estimate.total_mb)
    after_close = [int(x) for x in measured["after_close_bytes"]]
    assert max(after_close) < 16 * MIB  # one-time backend init, not the model
    assert max(after_close) - min(after_close) < 2 * MIB  # no growth per cycle


@cpu_build_only
def test_mid_tiny_model_against_a_real_load(mid_model: GgufHeader) -> None:
    check_against_llama_cpp(mid_model, n_ctx=2048, n_batch=512, cycles=3)


@cpu_build_only
def test_gqa_tiny_model_with_odd_sizes(tmp_path: Path) -> None:
    spec = TinyModelSpec(
        n_embd=256, n_layer=4, n_head=8, n_head_kv=4, n_ff=1024, context_length=2048
    )
    header = read_gguf_header(write_tiny_gguf(tmp_path / "gqa.gguf", spec))
    check_against_llama_cpp(header, n_ctx=1000, n_batch=300, cycles=2)


@pytest.mark.slow
@cpu_build_only
def test_gemma_against_a_real_load(gemma_path: Path) -> None:
    check_against_llama_cpp(read_gguf_header(gemma_path), n_ctx=1024, n_batch=512, cycles=3)
