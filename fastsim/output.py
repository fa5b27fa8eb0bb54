"""Writing results so that a reader never sees a half-written file: temporary name, then rename."""
from __future__ import annotations

import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from fastsim.errors import FastsimError


def _umask_mode() -> int:
    """0o666 less the process umask: the mode a plain open() would have given (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def _uninterruptible():
    """Ctrl-C waits until the file is whole or gone: a SIGINT that comes meanwhile is noted and sent
    again when the block ends. Catching KeyboardInterrupt is not enough: it can land after the
    temporary file is made and before there is a name to remove (an interrupted sweep left one
    behind). Python handles signals in the main thread only; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if came:
            os.kill(os.getpid(), signal.SIGINT)  # now handled as it would have been


def check_output_dir(path: str | Path) -> Path:
    """The output folder, refused before any work if results could not be written there: a file of
    that name, a file where a parent folder would go, or a folder without write permission."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FastsimError(f"--out / output.dir: {path} is a file, not a folder; name a folder (new or existing)")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FastsimError(f"--out / output.dir: {path} cannot be made, as {probe} is a file; name another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FastsimError(f"--out / output.dir: cannot write in {probe} (permission denied); name a folder "
                           "you can write to")
    return path


def _tmp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


@contextmanager
def _replacing(path: Path):
    """Yields a temporary path beside `path`: if the block completes, it becomes `path`; if not, it
    is removed. The one way results are written, so every writer gets the same guarantees."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _uninterruptible():
        tmp = _tmp_path(path)
        try:
            yield tmp
            os.chmod(tmp, _umask_mode())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with _replacing(Path(path)) as tmp:
        tmp.write_text(text)


def write_table_atomic(table, path: str | Path, fmt: str) -> Path:
    """Write a pyarrow Table as parquet, arrow (IPC file) or csv; returns the final path."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path).with_suffix({"parquet": ".parquet", "arrow": ".arrow", "csv": ".csv"}[fmt])
    with _replacing(path) as tmp:
        if fmt == "parquet":
            pq.write_table(table, tmp)
        elif fmt == "arrow":
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        else:  # CSV has no dictionary type: write plain strings
            plain = table.cast(pa.schema([pa.field(f.name, pa.string()) if pa.types.is_dictionary(f.type)
                                          else f for f in table.schema]))
            pacsv.write_csv(plain, tmp)
    return path


def write_json_atomic(path: str | Path, data) -> None:
    import json
    import math

    def clean(x):
        # JSON has no NaN: metrics that are undefined (no finished request) are written as null.
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    write_text_atomic(path, json.dumps(clean(data), indent=2) + "\n")


# Measurements of this machine, not of the simulated system: written to run.json, not summary.json,
# so that the same config and seed give byte-identical files wherever and whenever they run.
WALL_CLOCK_KEYS = ("wall_time_s",)


def simulated_only(summary: dict) -> dict:
    if "engines" in summary:
        return {"engines": {k: simulated_only(v) for k, v in summary["engines"].items()}}
    return {k: v for k, v in summary.items() if k not in WALL_CLOCK_KEYS}


def write_result(result, out_dir: str | Path, fmt: str) -> list[Path]:
    """requests.<fmt>, summary.json, run.json (fastsim's version and this machine's wall time) and,
    if recorded, timeline.<fmt>; with several engines each also gets <out>/<engine>/summary.json.
    Every file appears whole or not at all."""
    from fastsim import __version__

    out = Path(out_dir)
    written = [write_table_atomic(result.requests, out / "requests", fmt)]
    write_json_atomic(out / "summary.json", simulated_only(result.summary))
    written.append(out / "summary.json")
    if len(result.summaries) > 1:
        for name, s in result.summaries.items():
            write_json_atomic(out / name / "summary.json", simulated_only(s))
            written.append(out / name / "summary.json")
    write_json_atomic(out / "run.json", {"fastsim_version": __version__, "wall_time_s": {
        name: {k: s[k] for k in WALL_CLOCK_KEYS if k in s} for name, s in result.summaries.items()}})
    written.append(out / "run.json")
    if result.timelines:
        import pyarrow as pa
        tl = pa.concat_tables([t.append_column("engine", pa.array([name] * t.num_rows, pa.string()))
                               for name, t in result.timelines.items()])
        written.append(write_table_atomic(tl, out / "timeline", fmt))
    return written
