"""Numba kernels. The only package that imports numba; everything here takes arrays and scalars."""
import hashlib
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path


def compile_cache_dir() -> Path:
    """Where Numba keeps the compiled kernels: a per-user folder named by a hash of the engine's
    sources (and Numba's version). Numba would write beside the sources, into the installed package,
    where pip does not remove what it did not install (a left-over folder then shadows a later
    editable install), and it checks only a compiled function's own file, so code inlined from
    another module would stay stale after an edit; a folder per version of the sources avoids both."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(metadata.version("numba").encode())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastsim" / "numba" / h.hexdigest()[:16]


# Before numba is imported (it reads the variable then); a NUMBA_CACHE_DIR of the user's wins.
os.environ.setdefault("NUMBA_CACHE_DIR", str(compile_cache_dir()))
if "numba" in sys.modules:  # imported first by the caller: its configuration is read already
    from numba.core import config as _config

    _config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


def kernels_compiled() -> bool:
    """Whether the cache holds this version's compiled engine (a run then loads it in a second or two
    instead of compiling for minutes)."""
    return any(Path(os.environ["NUMBA_CACHE_DIR"]).glob("*/cluster_nb.run_cluster_nb-*.nbc"))


def prune_stale_caches() -> list[Path]:
    """Remove the compiled kernels of other versions of the engine's sources from fastsim's cache
    folder (each ~10-30 MB; another checkout of another version recompiles its own). Returns what
    was removed."""
    mine = compile_cache_dir()
    if Path(os.environ["NUMBA_CACHE_DIR"]) != mine:  # the user's own folder: not ours to prune
        return []
    stale = [d for d in mine.parent.iterdir() if d.is_dir() and d != mine] if mine.parent.is_dir() else []
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


from fastsim.engine import indexing  # noqa: E402  (after the cache folder is set)

indexing.install()
