"""Each format's grammars are ones llama.cpp builds samplers from, and end to end on tiny
random-weight models carrying each family's template, in both token loops: a forced call
grammar makes even a random model write a call whose arguments fit the tool's schema,
which the format's parser reads back; the lazy patterns fire on the call openings."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import msgspec
import pytest
from llama_cpp import Llama

from modeld.engine.base import StopCode, TokenLoop
from modeld.engine.chat_format import ChatFormatter
from modeld.engine.fastgrammar import grammar_sampler
from modeld.engine.select import token_loop
from modeld.tools import (
    Tool,
    ToolCallParser,
    ToolFormat,
    collect,
    detect_format,
    forced_grammar,
    generic_messages,
    lazy_grammar,
    trigger_matches,
)
from modeld.types import ChatMessage, GrammarConstraint, LoopKind, SamplingParams
from tests.support.engine import stream
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf
from tests.support.tool_templates import HERMES, LLAMA3, MISTRAL

TEMPLATES = {
    ToolFormat.HERMES: HERMES,
    ToolFormat.LLAMA3: LLAMA3,
    ToolFormat.MISTRAL: MISTRAL,
    ToolFormat.GENERIC: TINY_CHAT_TEMPLATE,
}
TOOLS = msgspec.convert(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,10}$"},
                        # (llama-cpp-python's converter ignores minimum/maximum)
                        "days": {"type": "integer"},
                    },
                    "required": ["city", "days"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "parameters": {
                    "type": "object",
                    "properties": {"zone": {"enum": ["UTC", "CET"]}},
                    "required": ["zone"],
                },
            },
        },
    ],
    tuple[Tool, ...],
)
QUESTION = [ChatMessage("user", "What is the weather in Paris?")]


@pytest.fixture(scope="module", params=list(ToolFormat), ids=str)
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ToolFormat, Llama]]:
    fmt: ToolFormat = request.param
    path = tmp_path_factory.mktemp(f"tiny-{fmt}") / "tiny.gguf"
    write_tiny_gguf(path, TinyModelSpec(seed=3, chat_template=TEMPLATES[fmt]))
    llama = Llama(str(path), n_ctx=2048, n_batch=512, n_threads=1, verbose=False)
    yield fmt, llama
    llama.close()


def _prompt(llama: Llama, tools: tuple[Tool, ...], choice: Any) -> tuple[ToolFormat, list[int]]:
    """Render through the template the model carries, as the engine does."""
    formatter = ChatFormatter(llama.metadata, bos_token="<s>", eos_token="</s>")
    fmt = detect_format(formatter.template_source(None))
    messages: tuple[ChatMessage, ...] = tuple(QUESTION)
    if fmt is ToolFormat.GENERIC:
        messages = generic_messages(messages, tools, choice)
    text = formatter.render(messages, None, max_chars=10**6, tools=tools)
    return fmt, llama.tokenize(text.encode(), add_bos=False, special=True)


def _valid(name: str, arguments: dict[str, Any]) -> bool:
    if name == "get_weather":
        return (
            set(arguments) == {"city", "days"}
            and isinstance(arguments["city"], str)
            and re.fullmatch("[A-Za-z ]{1,10}", arguments["city"]) is not None
            and isinstance(arguments["days"], int)
        )
    return name == "get_time" and arguments in ({"zone": "UTC"}, {"zone": "CET"})


@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
@pytest.mark.parametrize("lazy", [False, True], ids=["forced", "lazy"])
def test_llama_cpp_builds_every_formats_grammars(
    family: tuple[ToolFormat, Llama], lazy: bool, parallel: bool
) -> None:
    fmt, llama = family
    make = lazy_grammar if lazy else forced_grammar
    constraint = make(fmt, TOOLS, parallel=parallel)
    assert constraint.lazy == (lazy and fmt is not ToolFormat.GENERIC)
    sampler = grammar_sampler(llama._model.vocab, constraint)
    assert sampler, constraint.gbnf
    llama_cpp.llama_sampler_free(sampler)


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (ToolFormat.HERMES, "I will check. <tool_call>"),
        (ToolFormat.HERMES, "<tool_call>\n"),
        (ToolFormat.LLAMA3, "{"),
        (ToolFormat.LLAMA3, "<|python_tag|>{"),
        (ToolFormat.MISTRAL, "ok [TOOL_CALLS]"),
    ],
)
def test_the_lazy_patterns_fire_on_call_openings(fmt: ToolFormat, text: str) -> None:
    assert trigger_matches(fmt, text)
    assert not trigger_matches(fmt, text + "x")  # only on the token that completes it
    assert not trigger_matches(fmt, "plain text, no call")


@pytest.mark.parametrize("loop_kind", [LoopKind.C, LoopKind.PYTHON], ids=str)
@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_forced_call_is_a_schema_valid_call(
    family: tuple[ToolFormat, Llama], loop_kind: LoopKind, choice: str
) -> None:
    fmt, llama = family
    loop: TokenLoop = token_loop(loop_kind)
    tools = TOOLS if choice == "required" else TOOLS[1:]
    detected, prompt = _prompt(llama, tools, "required")
    assert detected is fmt
    grammar: GrammarConstraint = forced_grammar(fmt, tools, parallel=False)
    for seed in (1, 2):
        params = SamplingParams(max_tokens=300, temperature=1.0, seed=seed)
        seen = stream(loop, llama, prompt, params, grammar=grammar)
        assert seen.outcome is not None
        assert seen.outcome.stop_code is StopCode.STOP, seen.text
        parser = ToolCallParser(fmt)
        content, calls = collect(parser.feed(seen.text.decode(errors="replace")) + parser.finish())
        assert content.strip() == "", seen.text
        assert len(calls) == 1, seen.text
        arguments = msgspec.json.decode(calls[0].function.arguments)
        assert _valid(calls[0].function.name, arguments), seen.text
        if choice == "named":
            assert calls[0].function.name == "get_time"


def test_both_loops_write_the_same_forced_call(family: tuple[ToolFormat, Llama]) -> None:
    fmt, llama = family
    _, prompt = _prompt(llama, TOOLS, "required")
    grammar = forced_grammar(fmt, TOOLS, parallel=True)
    params = SamplingParams(max_tokens=200, temperature=0.8, seed=9)
    texts = {
        kind: stream(token_loop(kind), llama, prompt, params, grammar=grammar).text
        for kind in (LoopKind.C, LoopKind.PYTHON)
    }
    assert texts[LoopKind.C] == texts[LoopKind.PYTHON]


def test_paths_are_what_the_fixture_wrote(tmp_path: Path) -> None:
    """The tiny models keep their template (what detect_format reads)."""
    path = write_tiny_gguf(tmp_path / "m.gguf", TinyModelSpec(chat_template=HERMES))
    llama = Llama(str(path), n_ctx=64, n_threads=1, verbose=False)
    try:
        assert llama.metadata["tokenizer.chat_template"] == HERMES
    finally:
        llama.close()
