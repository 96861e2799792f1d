"""Hypothesis strategies for what a hostile client sends: text, any JSON value, JSON text.

Shared by the fuzz tests of the request decoders and of the flush path. Every
strategy leans towards what breaks decoders and storage: U+0000 and other
control characters, lone surrogates, astral characters, integers past 64 bits,
non-finite and huge floats, deep nesting, and text that is not JSON at all.

Fuzz tests run derandomized (``FUZZ``), so CI sees the same examples every run.
"""

import json
from typing import Any, Final

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from engine.core.limits import JSON_DEPTH_MAX, SLOT_METADATA_BYTES_MAX

# Derandomized: the same examples in every run, so a red CI is reproducible and a
# green one means the same thing each time. No example database for the same reason.
FUZZ: Final = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Characters that have broken a decoder or a database somewhere: NUL (PostgreSQL's
# text and jsonb refuse it), other C0/C1 controls, line and paragraph separators,
# a BOM, noncharacters, astral characters (surrogate pairs in JSON escapes), lone
# surrogates (not encodable as UTF-8), and what an error message quotes with.
HOSTILE_CHARACTERS: Final = (
    "\x00",
    "\x01",
    "\x1b",
    "\x7f",
    "\x85",
    "\u2028",
    "\ufeff",
    "\ufffe",
    "\uffff",
    "\U0001f9b7",
    "\U0010ffff",
    "\ud800",
    "\udfff",
    "`",
    '"',
    "\\",
)
# Integers at and past every boundary a value crosses: 32 and 64 bits, signed and not.
EDGE_INTEGERS: Final = (
    2**31 - 1,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64 - 1,
    2**64,
    10**30,
    -(10**30),
)
# Floats that JSON cannot write (nan, inf), that PostgreSQL's numeric rewrites
# (1e20 comes back as 100000000000000000000), and the extremes.
EDGE_FLOATS: Final = (
    float("nan"),
    float("inf"),
    -float("inf"),
    -0.0,
    5e-324,
    1e16,
    1e20,
    -1e20,
    9.223372036854775e18,
    9.223372036854776e18,
    1e300,
    1.7976931348623157e308,
)


def texts(*, max_size: int = 12, surrogates: bool = True) -> st.SearchStrategy[str]:
    """Short text, often with hostile characters (lone surrogates unless told not to)."""
    hostile = [c for c in HOSTILE_CHARACTERS if surrogates or not _is_surrogate(c)]
    return st.text(alphabet=st.one_of(st.sampled_from(hostile), st.characters()), max_size=max_size)


def _is_surrogate(character: str) -> bool:
    return "\ud800" <= character <= "\udfff"


def integers() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(-1_000, 1_000), st.integers(), st.sampled_from(EDGE_INTEGERS))


def floats() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(), st.sampled_from(EDGE_FLOATS))


def scalars(*, surrogates: bool = True) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), integers(), floats(), texts(surrogates=surrogates))


def json_values(*, surrogates: bool = True, max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value (and what JSON cannot hold: nan, inf, lone surrogates, big integers)."""
    return st.recursive(
        scalars(surrogates=surrogates),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(texts(surrogates=surrogates), children, max_size=4),
        ),
        max_leaves=max_leaves,
    )


def nested(depth: int, leaf: Any = 0) -> Any:
    """``leaf`` under ``depth`` containers, objects and arrays in turn (the outer one an object)."""
    value = leaf
    for level in range(depth):
        value = {"k": value} if level % 2 == 0 else [value]
    return value


def metadata(*, surrogates: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    """Slot metadata: mostly small objects of any JSON; sometimes at or past a limit."""
    return st.one_of(
        st.dictionaries(
            texts(surrogates=surrogates), json_values(surrogates=surrogates), max_size=4
        ),
        # Around the depth limit (the object itself is the first level).
        st.integers(JSON_DEPTH_MAX - 2, JSON_DEPTH_MAX + 2).map(
            lambda depth: {"k": nested(depth - 1)}
        ),
        # Around the size limit (compact encoding: {"k":"..."} is 8 bytes more).
        st.integers(SLOT_METADATA_BYTES_MAX - 10, SLOT_METADATA_BYTES_MAX + 10).map(
            lambda size: {"k": "x" * (size - 8)}
        ),
    )


def _dumps(value: Any, ascii_only: bool) -> str:
    # allow_nan: "NaN" and "Infinity" are what a careless client writes.
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)


def json_texts() -> st.SearchStrategy[str]:
    """JSON text for one value: well formed or not, shallow or thousands of levels deep."""
    brackets = st.tuples(
        st.integers(1, 3_000), st.sampled_from(['{"k":', "[", '{"k":[']), st.booleans()
    ).map(lambda spec: spec[1] * spec[0] + ("" if spec[2] else "0"))
    closed = st.integers(1, 3_000).map(lambda depth: "[" * depth + "]" * depth)
    return st.one_of(
        st.tuples(json_values(), st.booleans()).map(lambda pair: _dumps(*pair)),
        st.integers(JSON_DEPTH_MAX - 2, JSON_DEPTH_MAX + 2).map(
            lambda depth: json.dumps(nested(depth))
        ),
        brackets,
        closed,
        st.sampled_from(
            ["", "-", "1e400", "-1e400", "01", "0x10", "tru", '"\\u0000"', '"\\ud800"']
        ),
        texts(max_size=6),
    )


def to_bytes(text: str) -> bytes:
    """UTF-8, with lone surrogates as the invalid bytes a client could send."""
    return text.encode("utf-8", "surrogatepass")
