"""Integer indexing in the engine's compiled code without Python's negative-index wraparound.

Numba follows Python: a signed index i < 0 reads a[n + i], so every indexing operation tests the
index and adds the dimension's length, which in the event loop is mostly reloaded from the stack.
The engine never indexes from the end. Without the test, fast mode ran ~25% faster and exact mode
~15% (BWB lengths, 100K requests). So while Numba lowers a function defined in this package, a
signed integer index is used as it is; Numba's own library code, and every other package's, keeps
Python's semantics. Slices are untouched.

A negative index in the engine would now read outside the array instead of from its end. To check
that none occurs, run the tests with bounds checking in a fresh cache, which then raises on any:
NUMBA_BOUNDSCHECK=1 NUMBA_CACHE_DIR=$(mktemp -d) python -m pytest
"""
from __future__ import annotations

from numba.core import types
from numba.np import arrayobj

# In the mangled LLVM name of every function Numba compiles from this package ("7fastsim6engine...").
_ENGINE_MANGLED = "fastsim6engine"


def install() -> None:
    """Replace Numba's index fix-up by one that skips this package's functions (idempotent; should
    a Numba lack the hook, indexing keeps its wraparound and the engine only runs slower)."""
    original = getattr(arrayobj, "fix_integer_index", None)
    if original is None or getattr(original, "fastsim_engine", False):
        return

    def fix_integer_index(context, builder, idxty, idx, size):
        if idxty.signed and _ENGINE_MANGLED in builder.function.name:
            return context.cast(builder, idx, idxty, types.intp)
        return original(context, builder, idxty, idx, size)

    fix_integer_index.fastsim_engine = True
    arrayobj.fix_integer_index = fix_integer_index
