"""GBNF text, built rule by rule under a budget.

:class:`RuleSet` is where every rule of a grammar goes: it refuses (an
:class:`~modeld.errors.InvalidRequest` naming the caller's field) as soon as the rules'
text passes :attr:`~modeld.grammar.limits.SchemaLimits.max_grammar_bytes`, their count
passes ``max_rules``, or what llama.cpp will expand them into passes
``max_expanded_bytes``. llama.cpp's grammar parser copies an item ``x{m,n}`` ``n`` times,
so a short text can stand for a huge parsed grammar: :meth:`RuleSet.repeat` charges the
expansion, not the text. The budget is checked while rules are added, never after a
conversion has finished.
"""

from __future__ import annotations

from dataclasses import dataclass

from modeld.errors import InvalidRequest
from modeld.grammar.limits import SchemaLimits

__all__ = ["BudgetUsage", "RuleSet", "char_class", "class_char", "literal"]


def _escape_char(char: str, specials: str) -> str:
    code = ord(char)
    if char in specials:
        return "\\" + char
    if char == "\n":
        return "\\n"
    if char == "\r":
        return "\\r"
    if char == "\t":
        return "\\t"
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02X}"
    return char


def _is_name(text: str) -> bool:
    return text.replace("-", "").isalnum()


def literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    return '"' + "".join(_escape_char(char, '"\\') for char in text) + '"'


def char_class(body: str, *, negated: bool = False) -> str:
    """A GBNF character class; ``body`` is already in class syntax (ranges with ``-``)."""
    return "[" + ("^" if negated else "") + body + "]"


def class_char(char: str) -> str:
    """One character escaped for use inside a GBNF character class."""
    return _escape_char(char, "]\\-^[")


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """What a grammar cost: its text, its rules, and the size llama.cpp expands it to."""

    grammar_bytes: int
    rules: int
    expanded_bytes: int


class RuleSet:
    """The rules of one grammar, in order of definition, under ``limits``.

    Names are made unique here (``name``, ``name-1``, ...); a rule defined under a name
    already taken with the same body reuses it (the primitives shared by several
    schemas). ``param`` is the request field every refusal names.
    """

    def __init__(self, limits: SchemaLimits, param: str) -> None:
        self.limits = limits
        self.param = param
        self._rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}
        self._grammar_bytes = 0
        self._expanded_bytes = 0

    def usage(self) -> BudgetUsage:
        return BudgetUsage(self._grammar_bytes, len(self._rules), self._expanded_bytes)

    def refuse(self, message: str) -> InvalidRequest:
        return InvalidRequest(message, field=self.param)

    def unenforceable(self, why: str) -> InvalidRequest:
        """The refusal of a schema no grammar can enforce; ``why`` names what."""
        return self.refuse(f"the JSON schema cannot be enforced: {why}")

    def reserve(self, name: str, *, fixed: bool = False) -> str:
        """A fresh rule name based on ``name``, to define later (recursive ``$ref``).
        Names starting ``json-`` are kept for the generic JSON rules (``fixed``)."""
        # GBNF names are ASCII letters, digits and '-': a property named "日本" is not one
        base = "-".join(filter(None, "".join(
            c if c.isascii() and c.isalnum() else "-" for c in name.lower()
        ).split("-"))) or "r"  # fmt: skip
        if base.startswith("json-") and not fixed:
            base = "x-" + base
        candidate, counter = base, 0
        while candidate in self._rules:
            counter += 1
            candidate = f"{base}-{counter}"
        self._charge(len(candidate) + 8, rules=1)
        self._rules[candidate] = ""
        return candidate

    def define(self, name: str, body: str, *, fixed: bool = False) -> str:
        """Add ``name ::= body`` (or reuse an identical rule); returns the name used."""
        key = f"{name}\x00{body}"
        existing = self._by_body.get(key)
        if existing is not None:
            return existing
        rule = self.reserve(name, fixed=fixed)
        self.set(rule, body)
        self._by_body[key] = rule
        return rule

    def set(self, rule: str, body: str) -> None:
        """Give a reserved rule its body."""
        self._charge(len(body.encode("utf-8")), rules=0)
        self._rules[rule] = body

    def repeat(self, item: str, min_times: int, max_times: int | None) -> str:
        """``item`` repeated ``min_times`` to ``max_times`` (None: unbounded), charging
        what llama.cpp expands it to. A counted repetition gets a rule of its own, and
        repeats a rule reference: llama.cpp bounds the rules one sequence may expand to
        (its ``MAX_REPETITION_THRESHOLD``), counting those of any group around it."""
        if max_times is not None and max_times < min_times:
            raise self.refuse(f"a repetition asks for at least {min_times} and at most {max_times}")
        limit = self.limits.max_repetition
        if max(min_times, max_times or 0) > limit:  # a count the schema walk did not see
            raise self.refuse(
                f"a repetition of {max(min_times, max_times or 0)} is over the {limit} bound"
            )
        if max_times == 0:
            return '""'
        if not _is_name(item):
            item = self.define("item", item)
        if max_times is None:
            if min_times <= 1:
                return item + ("*" if min_times == 0 else "+")
            counts = f"{min_times},"
        elif min_times == max_times == 1:
            return item
        elif (min_times, max_times) == (0, 1):
            return f"{item}?"
        else:
            counts = f"{min_times}" if min_times == max_times else f"{min_times},{max_times}"
        body = f"{item}{{{counts}}}"
        existing = self._by_body.get(f"repeat\x00{body}")
        if existing is not None:
            return existing
        copies = max(min_times, max_times if max_times is not None else min_times + 1)
        self.charge_expanded(copies * (len(item) + 4))
        return self.define("repeat", body)

    def charge_expanded(self, size_bytes: int) -> None:
        self._expanded_bytes += size_bytes
        if self._expanded_bytes > self.limits.max_expanded_bytes:
            raise self.refuse(
                "the JSON schema makes a grammar that llama.cpp would expand past "
                f"{self.limits.max_expanded_bytes} bytes (repetition counts multiply)"
            )

    def _charge(self, size_bytes: int, *, rules: int) -> None:
        self._grammar_bytes += size_bytes
        self._expanded_bytes += size_bytes
        if self._grammar_bytes > self.limits.max_grammar_bytes:
            raise self.refuse(
                f"the JSON schema makes a grammar over {self.limits.max_grammar_bytes} bytes"
            )
        if len(self._rules) + rules > self.limits.max_rules:
            raise self.refuse(
                f"the JSON schema makes a grammar of over {self.limits.max_rules} rules"
            )
        if self._expanded_bytes > self.limits.max_expanded_bytes:
            self.charge_expanded(0)

    def text(self) -> str:
        """The whole grammar, one rule per line."""
        return "".join(f"{name} ::= {body}\n" for name, body in self._rules.items())
