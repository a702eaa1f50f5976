"""Tool calling through ``LlamaEngine`` (the library's engine), in both token loops, on a
tiny random-weight model carrying a Hermes template: the template gets the tools, the
format is read from it, both grammars pass the engine's check, and a forced call comes
back schema-valid through the parser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from modeld.engine.base import StopCode, TokenLoop
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.errors import InvalidRequest
from modeld.tools import (
    ToolCallParser,
    ToolFormat,
    collect,
    forced_grammar,
    lazy_grammar,
    resolve_format,
)
from modeld.types import ChatMessage, GrammarConstraint, SamplingParams
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf
from tests.support.tool_templates import HERMES
from tests.tools.test_tool_grammars import TOOLS

SETTINGS = EngineSettings(n_ctx=2048, n_batch=512, n_threads=1, n_gpu_layers=0)


@pytest.fixture(scope="module")
def hermes_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hermes") / "tiny-hermes.gguf"
    return write_tiny_gguf(path, TinyModelSpec(seed=4, chat_template=HERMES))


@pytest.fixture
def engine(hermes_model: Path, loop: TokenLoop) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(hermes_model, SETTINGS, loop, 2048)
    yield engine
    engine.close()


def test_a_forced_call_through_the_engine(engine: LlamaEngine, loop: TokenLoop) -> None:
    fmt = resolve_format(engine.chat_template_source(None), None)
    assert fmt is ToolFormat.HERMES
    assert resolve_format(engine.chat_template_source(None), "generic") is ToolFormat.GENERIC
    messages = [ChatMessage("user", "Weather in Paris for two days?")]
    with_tools = engine.prepare_chat(messages, 200, None, tools=TOOLS)
    without = engine.prepare_chat(messages, 200, None)
    assert len(with_tools) > len(without)  # the template listed the tools
    grammar = forced_grammar(fmt, TOOLS, parallel=False)
    engine.check_grammar(grammar)
    engine.check_grammar(lazy_grammar(fmt, TOOLS, parallel=True))
    ring = loop.new_ring(1 << 16)
    params = SamplingParams(max_tokens=200, temperature=0.9, seed=5)
    outcome = engine.generate(ring, with_tools, params, grammar)
    text, _, _ = ring.drain()
    ring.close()
    assert outcome.stop_code is StopCode.STOP, text
    parser = ToolCallParser(fmt)
    content, calls = collect(parser.feed(text.decode(errors="replace")) + parser.finish())
    assert content == ""
    assert len(calls) == 1
    assert calls[0].function.name in {"get_weather", "get_time"}
    assert isinstance(msgspec.json.decode(calls[0].function.arguments), dict)


def test_a_lazy_grammar_llama_cpp_refuses_is_a_400(engine: LlamaEngine) -> None:
    bad = GrammarConstraint(gbnf="root ::= [unclosed", trigger_patterns=("^(x)$",))
    with pytest.raises(InvalidRequest) as caught:
        engine.check_grammar(bad)
    assert caught.value.field == "format"
