"""Writing results so that a reader never sees a half-written file or a folder that mixes two runs: a
single file under a temporary name, then renamed; a run's folder staged whole, then swapped in."""
from __future__ import annotations

import os
import shutil
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
def replacing(path: Path):
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
    with replacing(Path(path)) as tmp:
        tmp.write_text(text)


def _write_table(table, path: Path, fmt: str) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    else:  # CSV has no dictionary type: write plain strings
        plain = table.cast(pa.schema([pa.field(f.name, pa.string()) if pa.types.is_dictionary(f.type)
                                      else f for f in table.schema]))
        pacsv.write_csv(plain, path)


TABLE_SUFFIX = {"parquet": ".parquet", "arrow": ".arrow", "csv": ".csv"}


def write_table_atomic(table, path: str | Path, fmt: str) -> Path:
    """Write a pyarrow Table as parquet, arrow (IPC file) or csv; returns the final path."""
    path = Path(path).with_suffix(TABLE_SUFFIX[fmt])
    with replacing(path) as tmp:
        _write_table(table, tmp, fmt)
    return path


def _json_text(data) -> str:
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

    return json.dumps(clean(data), indent=2) + "\n"


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, _json_text(data))


# Measurements of this machine, not of the simulated system: written to run.json, not summary.json,
# so that the same config and seed give byte-identical files wherever and whenever they run.
WALL_CLOCK_KEYS = ("wall_time_s",)


def simulated_only(summary: dict) -> dict:
    if "engines" in summary:
        return {"engines": {k: simulated_only(v) for k, v in summary["engines"].items()}}
    return {k: v for k, v in summary.items() if k not in WALL_CLOCK_KEYS}


STAGING_PREFIX = ".fastsim-staging-"
# What a run folder holds besides the per-engine summaries; a folder an earlier fastsim wrote (no
# list of files in its run.json) loses these before a new run's files go in.
_RUN_FILES = ("summary.json", "run.json", "config.yaml") + tuple(
    stem + suffix for stem in ("requests", "timeline") for suffix in TABLE_SUFFIX.values())


# What `fastsim plot` draws into <out>/plots: figures of a run, which a new run into the folder makes
# stale (its own figures are drawn again by the next `fastsim plot`).
PLOTS_DIR = "plots"
FIGURES = ("latency_cdf", "timeline", "sweep_throughput", "sweep_latency", "pareto")
FIGURE_FORMATS = ("png", "svg")


def remove_figures(folder: Path, keep: set[Path] = frozenset()) -> None:
    """fastsim's figures in `folder` other than `keep` (a user's own files there stay)."""
    for name in FIGURES:
        for fmt in FIGURE_FORMATS:
            p = folder / f"{name}.{fmt}"
            if p not in keep:
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def clean_leftovers(out: Path) -> list[Path]:
    """What killed writes left in `out`: staging folders of processes that are gone, and the hidden
    temporary files of run files (`.requests.parquet.x1y2.tmp`) that earlier versions wrote beside them."""
    removed = []
    for p in out.glob(STAGING_PREFIX + "*"):
        pid = p.name[len(STAGING_PREFIX):].split("-")[0]
        if p.is_dir() and not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in out.glob(".*.tmp"):
        if any(p.name.startswith(f".{name}.") for name in _RUN_FILES):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _previous_files(out: Path) -> list[Path]:
    """The files of the run that wrote `out` before: those its run.json lists, or fastsim's names if
    an earlier version wrote it (a run.json without the list). A folder without run.json is no
    fastsim run's, and its files are the user's: none is taken for a previous run's."""
    import json

    try:
        listed = json.loads((out / "run.json").read_text()).get("files")
    except OSError:
        return []
    except (ValueError, AttributeError):
        listed = None
    names = listed if isinstance(listed, list) and all(isinstance(n, str) for n in listed) else _RUN_FILES
    root = out.resolve()
    inside = [out / n for n in names if (out / n).resolve().is_relative_to(root) and (out / n).resolve() != root]
    return [p for p in inside if p.is_file()]


def run_metadata(config=None, command: list[str] | None = None, started_at: float | None = None) -> dict:
    """What made a run: fastsim's and its libraries' versions, the command line, when it ran."""
    import platform
    import shlex
    import sys
    import time
    from datetime import datetime, timezone

    import numba
    import numpy
    import pyarrow

    from fastsim import __version__

    def iso(t):
        return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")

    now = time.time()
    meta = {"fastsim_version": __version__,
            "command": shlex.join(command if command is not None else ["python"] + sys.argv),
            "started_at": iso(started_at if started_at is not None else now), "finished_at": iso(now),
            "python": platform.python_version(), "numpy": numpy.__version__, "numba": numba.__version__,
            "pyarrow": pyarrow.__version__, "machine": platform.platform()}
    if config is not None:
        meta["seed"] = config.simulation.seed
    return meta


def write_result(result, out_dir: str | Path, fmt: str, config=None, command: list[str] | None = None,
                 started_at: float | None = None) -> list[Path]:
    """requests.<fmt>, summary.json, config.yaml (the resolved config, if given), run.json (what made
    the run: versions, command line, times, this machine's wall time, the list of files) and, if
    recorded, timeline.<fmt>; with several engines each also gets <out>/<engine>/summary.json.

    All or nothing: every file is written into a hidden staging folder inside `out`, and only when
    all are whole do they replace the previous run's, whose files not written again (a timeline, a
    format) are removed, so one folder never mixes two runs. Ctrl-C while staging leaves the
    previous run as it was; the swap itself is a few renames that Ctrl-C waits for."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    with _uninterruptible():  # a name to remove exists as soon as the folder does
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out))
    try:
        files: list[str] = []

        def put(rel: str, write) -> None:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            write(stage / rel)
            files.append(rel)

        put("requests" + TABLE_SUFFIX[fmt], lambda p: _write_table(result.requests, p, fmt))
        put("summary.json", lambda p: p.write_text(_json_text(simulated_only(result.summary))))
        if len(result.summaries) > 1:
            for name, s in result.summaries.items():
                put(f"{name}/summary.json", lambda p, s=s: p.write_text(_json_text(simulated_only(s))))
        if result.timelines:
            import pyarrow as pa
            tl = pa.concat_tables([t.append_column("engine", pa.array([name] * t.num_rows, pa.string()))
                                   for name, t in result.timelines.items()])
            put("timeline" + TABLE_SUFFIX[fmt], lambda p: _write_table(tl, p, fmt))
        if config is not None:
            put("config.yaml", lambda p: p.write_text(config_yaml(config)))
        files.append("run.json")
        meta = run_metadata(config, command, started_at) | {
            "wall_time_s": {name: {k: s[k] for k in WALL_CLOCK_KEYS if k in s}
                            for name, s in result.summaries.items()},
            "files": files}
        (stage / "run.json").write_text(_json_text(meta))
        mode = _umask_mode()
        with _uninterruptible():
            if (out / "run.json").is_file():
                remove_figures(out / PLOTS_DIR)  # drawn from the run being replaced
            for old in _previous_files(out):
                if old.relative_to(out).as_posix() not in files:
                    old.unlink(missing_ok=True)
                    if old.parent != out and not any(old.parent.iterdir()):
                        old.parent.rmdir()  # an engine's folder that only held its summary
            for rel in files:  # run.json last: while it names the old files, the old run is what it describes
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.chmod(stage / rel, mode)
                os.replace(stage / rel, out / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [out / rel for rel in files]


def config_yaml(config) -> str:
    """The resolved config as YAML: every key with the value the run used, defaults included, so
    that `fastsim run config.yaml` in the output folder runs it again."""
    import yaml

    from fastsim import __version__

    head = (f"# the resolved config of this run (fastsim {__version__}); `fastsim run` takes it as it is\n"
            "# (file paths as given: relative ones to the folder fastsim ran in)\n")
    return head + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
