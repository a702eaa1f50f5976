"""A JSON schema ``pattern`` (an ECMA-262 regular expression, the common subset) as GBNF
for the characters of a JSON string.

What is understood: literal characters and escapes, ``.``, classes (``[a-z]``, ``[^"]``,
``\\d \\w \\s`` and their negations), groups (``(...)``, ``(?:...)``), alternation,
quantifiers (``? * + {n} {n,} {n,m}``, a lazy ``?`` after one changes nothing for a
grammar), and ``^``/``$`` at the ends. A pattern not anchored at an end may have any
characters there (JSON Schema patterns search, they do not match whole strings).
Everything else (backreferences, lookaround, anchors inside, unicode property classes)
is refused: a grammar cannot enforce it. Nesting and repetition counts are bounded by
:class:`~modeld.grammar.limits.SchemaLimits`; every rule goes through the budget.

A pattern describes the decoded string; the grammar writes its JSON text, so ``"`` and
``\\`` become their escapes, and a negated class or ``.`` matches any character JSON lets
stand unescaped.
"""

from __future__ import annotations

from modeld.grammar.gbnf import RuleSet, char_class, class_char, literal

__all__ = ["pattern_rule"]

_JSON_UNSAFE = '"\\'
_CLASS_ESCAPES = {"d": "0-9", "w": "a-zA-Z0-9_", "s": " \\t\\n\\r\\x0B\\x0C"}
_NO_CONTROL = '"\\\\\\x00-\\x1F\\x7F'  # class body: characters a JSON string escapes
_PLAIN_CHAR = f"[^{_NO_CONTROL}]"
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


def _char_text(char: str) -> str:
    """One decoded character as the GBNF for its JSON text."""
    if char in _JSON_UNSAFE:
        return literal("\\" + char)
    if char == "\n":
        return literal("\\n")
    if char == "\t":
        return literal("\\t")
    if ord(char) < 0x20:
        return literal(f"\\u{ord(char):04x}")
    return literal(char)


class _PatternParser:
    """Recursive descent over one pattern; depth bounded by ``max_pattern_depth``."""

    def __init__(self, pattern: str, rules: RuleSet) -> None:
        self.text = pattern
        self.pos = 0
        self.rules = rules
        self.depth = 0

    def refuse(self, why: str) -> Exception:
        return self.rules.unenforceable(f"the pattern {self.text!r}: {why}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        char = self.peek()
        if not char:
            raise self.refuse("it ends too early")
        self.pos += 1
        return char

    def alternation(self) -> str:
        self.depth += 1
        if self.depth > self.rules.limits.max_pattern_depth:
            raise self.refuse(f"groups nest over {self.rules.limits.max_pattern_depth} deep")
        branches = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence())
        self.depth -= 1
        return branches[0] if len(branches) == 1 else "(" + " | ".join(branches) + ")"

    def sequence(self) -> str:
        items: list[str] = []
        while self.peek() not in ("", "|", ")"):
            if self.peek() in "^$":
                raise self.refuse("'^' and '$' only at its ends")
            atom = self.atom()
            items.append(self.quantified(atom))
        body = " ".join(items) if items else '""'
        return body if len(items) <= 1 else "(" + body + ")"

    def atom(self) -> str:
        char = self.take()
        if char == "(":
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif self.peek() == "?":
                raise self.refuse("lookaround and named groups are not supported")
            inner = self.alternation()
            if self.take() != ")":
                raise self.refuse("a group is not closed")
            return self.rules.define("pattern-group", inner)
        if char == "[":
            return self.klass()
        if char == ".":
            return self.rules.define("pattern-any", _any_char())
        if char == "\\":
            return self.escape()
        if char in "*+?{":
            raise self.refuse(f"{char!r} has nothing to repeat")
        if char in ")]}":
            raise self.refuse(f"an unbalanced {char!r}")
        return _char_text(char)

    def escape(self) -> str:
        char = self.take()
        if char.lower() in _CLASS_ESCAPES:
            return _class_text(_CLASS_ESCAPES[char.lower()], negated=char.isupper())
        if char in _SIMPLE_ESCAPES:
            return _char_text(_SIMPLE_ESCAPES[char])
        if char.isalnum():
            raise self.refuse(f"the escape \\{char} is not supported")
        return _char_text(char)

    def klass(self) -> str:
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        body: list[str] = []
        unsafe: list[str] = []
        first = True
        while first or self.peek() != "]":
            first = False
            char = self.take()
            if char == "\\":
                escaped = self.take()
                if escaped.lower() in _CLASS_ESCAPES and escaped.islower():
                    body.append(_CLASS_ESCAPES[escaped])
                    continue
                if escaped.isalnum() and escaped not in _SIMPLE_ESCAPES:
                    raise self.refuse(f"the class escape \\{escaped} is not supported")
                char = _SIMPLE_ESCAPES.get(escaped, escaped)
            if (
                self.peek() == "-"
                and self.pos + 1 < len(self.text)
                and self.text[self.pos + 1] != "]"
            ):
                self.pos += 1
                end = self.take()
                if end == "\\":
                    end = self.take()
                if ord(end) < ord(char):
                    raise self.refuse(f"the range {char}-{end} is backwards")
                body.append(f"{class_char(char)}-{class_char(end)}")
                unsafe.extend(c for c in _JSON_UNSAFE if ord(char) <= ord(c) <= ord(end))
                continue
            if char in _JSON_UNSAFE:
                unsafe.append(char)
            else:
                body.append(class_char(char))
        self.take()  # the closing ']'
        text = "".join(body)
        if negated:
            # any character JSON lets stand unescaped, except the ones listed
            return char_class(text + _NO_CONTROL, negated=True)
        parts = [char_class(text)] if text else []
        parts.extend(_char_text(char) for char in dict.fromkeys(unsafe))
        if not parts:
            raise self.refuse("an empty class matches nothing")
        return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"

    def quantified(self, atom: str) -> str:
        char = self.peek()
        if char not in ("*", "+", "?", "{"):
            return atom
        self.pos += 1
        if char == "{":
            low, high = self.counts()
        else:
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        if self.peek() == "?":  # lazy: the same strings
            self.pos += 1
        if self.peek() in ("*", "+", "{"):
            raise self.refuse("a quantifier directly after a quantifier")
        item = atom if _is_single(atom) else self.rules.define("pattern-item", atom)
        return self.rules.repeat(item, low, high)

    def counts(self) -> tuple[int, int | None]:
        end = self.text.find("}", self.pos)
        if end < 0:
            raise self.refuse("a '{' is not closed")
        spec, self.pos = self.text[self.pos : end], end + 1
        low_text, comma, high_text = spec.partition(",")
        if not low_text.isdigit() or (high_text and not high_text.isdigit()):
            raise self.refuse(f"{{{spec}}} is not a repetition count")
        limit = self.rules.limits.max_repetition
        if (
            len(low_text) > 6
            or len(high_text) > 6
            or max(int(low_text), int(high_text or 0)) > limit
        ):
            raise self.refuse(f"{{{spec}}} repeats over the {limit} bound")
        low = int(low_text)
        high = None if comma and not high_text else int(high_text or low_text)
        return low, high


def _is_single(atom: str) -> bool:
    """A rule name: needs no rule of its own to be repeated."""
    return atom.replace("-", "").isalnum()


def _class_text(body: str, *, negated: bool) -> str:
    if negated:
        return char_class(body + _NO_CONTROL, negated=True)
    return char_class(body)


def _any_char() -> str:
    return f'{_PLAIN_CHAR} | "\\\\" ["\\\\/bfnrt]'


def pattern_rule(pattern: str, rules: RuleSet, name: str) -> str:
    """A rule for the JSON text (quotes included) of a string matching ``pattern``.

    Raises :class:`~modeld.errors.InvalidRequest` (the rule set's field) for a pattern
    that cannot be enforced or that passes a bound.
    """
    anchored_start = pattern.startswith("^")
    anchored_end = pattern.endswith("$") and not pattern.endswith("\\$")
    inner = pattern[1 if anchored_start else 0 : len(pattern) - 1 if anchored_end else None]
    parser = _PatternParser(inner, rules)
    body = parser.alternation()
    if parser.pos != len(inner):
        raise parser.refuse(f"an unbalanced {inner[parser.pos]!r}")
    parts = ['"\\""']
    if not anchored_start:
        parts.append(rules.define("pattern-any", _any_char()) + "*")
    parts.append(body)
    if not anchored_end:
        parts.append(rules.define("pattern-any", _any_char()) + "*")
    parts.append('"\\""')
    return rules.define(name, " ".join(parts))
