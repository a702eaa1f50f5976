"""Chat templates render as transformers renders them, inside Jinja2's immutable
sandbox, bounded in time, memory and output; whatever stops one is a ChatTemplateError
saying why."""

from __future__ import annotations

import math
import time

import pytest

from modeld.chat import MAX_TEMPLATE_CHARS, ChatTemplate, render_bounded
from modeld.chat.sandbox import TemplateRefused, compile_template
from modeld.errors import ChatTemplateError
from modeld.types import ChatMessage
from tests.support.chat_templates import CONVERSATION, GEMMA3


def render(source: str, messages: list[ChatMessage] = CONVERSATION, max_chars: int = 10**6) -> str:
    template = ChatTemplate(source, where="test")
    return template.render(messages, bos_token="<bos>", eos_token="<eos>", max_chars=max_chars)


def test_the_official_gemma3_template_renders_as_transformers_does() -> None:
    """The rendering compat.md §5.3 recorded from transformers' own formatter."""
    assert render(GEMMA3) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is the capital of France?"
        "<end_of_turn>\n<start_of_turn>model\nParis.<end_of_turn>\n<start_of_turn>user\n"
        "And of Italy?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_the_templates_own_refusal_is_the_message() -> None:
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render(GEMMA3, [ChatMessage("user", "a"), ChatMessage("user", "b")])


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ messages | tojson }}", '[{"role": "user", "content": "é"}]'),
        ("{% for m in messages %}{% if loop.first %}{% break %}{% endif %}{% endfor %}ok", "ok"),
        ("{% generation %}{{ eos_token }}{% endgeneration %}", "<eos>"),
        ("{{ tools is none }} {{ add_generation_prompt }}", "True True"),
        ("{{ strftime_now('%Y') | length }}", "4"),
        ("  {% if true %}\n  x\n  {% endif %}\n", "  x\n"),  # trim_blocks + lstrip_blocks
    ],
    ids=["tojson-unicode", "loopcontrols", "generation-tag", "variables", "strftime", "trim"],
)  # fmt: skip
def test_the_variables_and_extensions_templates_expect(source: str, expected: str) -> None:
    assert render(source, [ChatMessage("user", "é")]) == expected


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "forbids"),
        ("{{ cycler.__init__.__globals__.os }}", "forbids"),
        ("{{ self.__init__.__globals__ }}", "forbids"),
        ("{{ messages.append(1) }}", "forbids"),
        ("{{ 'a' * 1000000000 }}", "forbids"),
        ("{{ [0] * 100000000 }}", "forbids"),
        ("{{ 2 ** 100000 }}", "forbids"),
        ("{{ 'x' | center(1000000000) }}", "forbids"),
        ("{{ 'x' | indent(1000000000) }}", "forbids"),
        ("{{ {'a': 1} | tojson(indent=1000000000) }}", "forbids"),
        ("{{ '{:>999999999}'.format(1) }}", "forbids"),
        ("{{ '%*d' % (10, 1) }}", "forbids"),
        ("{% set s = 'x' * 4000000 %}{{ ([s] * 100)|join }}", "forbids"),
        ("{% set s = 'x' * 4000000 %}{{ s.replace('x', 'xx') }}", "forbids"),
        ("{% set s = 'x' * 4000000 %}{{ s|replace('x', 'xx') }}", "forbids"),
        ("{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "forbids"),  # noqa: E501
        ("{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "forbids"),  # noqa: E501
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursed"),
        ("{{ undefined_thing.attr }}", "UndefinedError"),
        ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "over 1000000 characters"),
    ],
)  # fmt: skip
def test_what_the_sandbox_stops(source: str, reason: str) -> None:
    with pytest.raises(ChatTemplateError, match=reason):
        render(source)


def test_a_render_past_its_deadline_stops() -> None:
    endless = compile_template(
        "{% set x = range(1000)|list %}{% for a in x %}{% for b in x %}{% for c in x %}"
        "{% endfor %}{% endfor %}{% endfor %}"
    )
    started_s = time.monotonic()
    with pytest.raises(TemplateRefused, match=r"ran past 0\.2 s"):
        render_bounded(lambda: endless.generate(), max_chars=100, deadline_s=0.2)
    # Unstopped, it would run for hours; a busy machine may take a while past 0.2 s.
    assert time.monotonic() - started_s < 60.0


def test_a_render_that_grows_the_process_stops() -> None:
    """Many values of allowed size, made one filter call at a time inside Jinja's own
    code (no single step is refused): the growth bound stops it. No deadline: on a slow
    machine the default one would fire first, and this test is about the growth bound."""
    growing = compile_template("{{ range(100000)|map('string')|map('center', 2000)|list }}")
    with pytest.raises(TemplateRefused, match="grew the process by over 64 MiB"):
        render_bounded(
            lambda: growing.generate(),
            max_chars=100,
            max_growth_bytes=64 * 1024 * 1024,
            deadline_s=math.inf,
        )


def test_size_and_syntax_are_checked_once_at_compile() -> None:
    with pytest.raises(ChatTemplateError, match=f"at most {MAX_TEMPLATE_CHARS}"):
        ChatTemplate("x" * (MAX_TEMPLATE_CHARS + 1), where="big")
    with pytest.raises(ChatTemplateError, match="big: the chat template is not valid Jinja"):
        ChatTemplate("{% if %}", where="big")
