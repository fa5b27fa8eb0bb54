"""One exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class FastsimError(ValueError):
    """A user-facing error: the message names the field, the value and the fix."""


def closest(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Known names nearest to `name`, case-insensitively, best first."""
    known = list(known)
    lower = {k.lower(): k for k in known}
    hits = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.3)
    if not hits:
        # A bare fragment ("8b", "h100") is closer to the names containing it than to any ratio match.
        hits = [k for k in lower if name.lower() in k][:n]
    return [lower[h] for h in hits]


def unknown(kind: str, name: str, known: Iterable[str], listing: str) -> FastsimError:
    near = closest(name, known)
    hint = f"closest: {', '.join(near)}" if near else "none close"
    return FastsimError(f"unknown {kind} {name!r} ({hint}); `{listing}` lists them all")
