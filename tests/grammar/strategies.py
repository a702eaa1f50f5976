"""Random JSON schemas for property tests and the fuzz target: every keyword the
converter reads, with counts that reach past the bounds."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

COUNTS = st.one_of(
    st.integers(0, 8), st.integers(0, 3000), st.sampled_from([10**6, 10**9, 2000, 1999])
)
PATTERN_ATOMS = st.sampled_from(
    ["a", "b", ".", "\\d", "\\w", "[a-z]", "[^x]", '"', "\\\\", "(a|b)", "(?:ab)", "x{3}",
     "y{0,2000}", "z+", "q*", "(", ")", "[", "|", "{2}", "^", "$", "\\p{L}", "(?=a)"]
)  # fmt: skip
PATTERNS = st.lists(PATTERN_ATOMS, max_size=12).map("".join)
LEAVES: st.SearchStrategy[Any] = st.one_of(
    st.just({}),
    st.just(True),
    st.builds(dict, type=st.sampled_from(["string", "integer", "number", "boolean", "null"])),
    st.fixed_dictionaries({"type": st.just("string")}, optional={
        "minLength": COUNTS, "maxLength": COUNTS, "pattern": PATTERNS,
        "format": st.sampled_from(["date", "time", "date-time", "uuid", "email"]),
    }),
    st.fixed_dictionaries({"type": st.sampled_from(["integer", "number"])}, optional={
        "minimum": st.sampled_from([0, 1, -5, 2.5]), "maximum": st.just(10),
    }),
    st.builds(dict, enum=st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=600)),
    st.builds(dict, const=st.one_of(st.integers(), st.text(max_size=8), st.none())),
)  # fmt: skip


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # property names become rule names: unicode, spaces, dashes and digits included
    names = st.one_of(
        st.sampled_from(["a", "日本", "ñ²", "a b", "-", "x-1", "json-value", "root", "é"]),
        st.text(min_size=1, max_size=6),
    )
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("array")}, optional={
            "items": inner, "minItems": COUNTS, "maxItems": COUNTS,
            "prefixItems": st.lists(inner, max_size=3),
        }),
        st.fixed_dictionaries({"type": st.just("object")}, optional={
            "properties": st.dictionaries(names, inner, max_size=6),
            "required": st.lists(names, max_size=3),
            "additionalProperties": st.one_of(st.booleans(), inner),
            "minProperties": COUNTS, "maxProperties": COUNTS,
        }),
        st.builds(dict, anyOf=st.lists(inner, min_size=1, max_size=4)),
        st.builds(dict, oneOf=st.lists(inner, min_size=1, max_size=4)),
        st.builds(dict, type=st.lists(st.sampled_from(["string", "null", "integer"]),
                                      min_size=1, max_size=3)),
    )  # fmt: skip


SCHEMAS: st.SearchStrategy[Any] = st.recursive(LEAVES, _containers, max_leaves=40)
