"""Reading request traces: Azure LLM inference CSVs, Mooncake JSONL, Vidur/etalon CSVs and fastsim's
own request tables. Every reader returns (arrival_s or None, prompt_tokens, output_tokens, block
identities) and names the file and line of anything malformed."""
from __future__ import annotations

import csv
import re
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastsim.errors import FastsimError


@dataclass(frozen=True)
class TraceRows:
    arrival_s: np.ndarray | None   # None: lengths only, arrivals come from the client's process
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    # Mooncake: ids of the prompt's consecutive `hash_block_tokens`-token blocks (equal ids = equal
    # content), as a ragged array: request i's ids are hash_ids[hash_offsets[i]:hash_offsets[i + 1]].
    hash_offsets: np.ndarray | None = None
    hash_ids: np.ndarray | None = None
    hash_block_tokens: int = 0

    def __len__(self) -> int:
        return self.prompt_tokens.size

    def take(self, idx: np.ndarray) -> TraceRows:
        """The rows at `idx` (sorted indices), block identities included."""
        offsets = ids = None
        if self.hash_offsets is not None:
            lens = np.diff(self.hash_offsets)[idx]
            offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            # Position of every kept id: each row's start, then 0, 1, 2, ... within the row.
            within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lens)
            ids = self.hash_ids[np.repeat(self.hash_offsets[idx], lens) + within]
        return TraceRows(None if self.arrival_s is None else self.arrival_s[idx], self.prompt_tokens[idx],
                         self.output_tokens[idx], offsets, ids, self.hash_block_tokens)


def _count(value: str, where: str, column: str) -> int:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FastsimError(f"{where}: {column} = {value!r} is not a number") from None
    if not np.isfinite(v) or v < 1 or v != int(v):
        raise FastsimError(f"{where}: {column} = {value!r} must be a whole number of tokens >= 1")
    return int(v)


def _csv_rows(path: Path, need: tuple[str, ...], fmt: str):
    try:
        fh = path.open(newline="")
    except OSError as e:
        raise FastsimError(f"trace: cannot open {str(path)!r} ({e.strerror})") from None
    with fh:
        reader = csv.DictReader(fh)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise FastsimError(f"{path}:1: not {'an' if fmt[0] in 'AEIOU' else 'a'} {fmt} trace: no column {missing[0]!r} "
                               f"(columns: {', '.join(reader.fieldnames or [])})")
        for line, row in enumerate(reader, start=2):
            if None in row.values() or None in row:
                raise FastsimError(f"{path}:{line}: wrong number of fields for a {fmt} trace")
            yield f"{path}:{line}", row


# Azure's traces write e.g. "2023-11-16 18:15:46.6805900"; anything else (a time zone, a truncated
# line) is refused before numpy guesses at it.
_AZURE_STAMP = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d{1,9})?")


def read_azure(path: Path) -> TraceRows:
    """Azure LLM inference trace: TIMESTAMP (wall clock), ContextTokens, GeneratedTokens."""
    stamps, prompt, output = [], [], []
    for where, row in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), "Azure"):
        stamp = row["TIMESTAMP"].strip()
        if not _AZURE_STAMP.fullmatch(stamp):
            raise FastsimError(f"{where}: TIMESTAMP = {row['TIMESTAMP']!r} is not a date and time "
                               "(expected YYYY-MM-DD HH:MM:SS[.fraction])")
        try:
            stamps.append(np.datetime64(stamp.replace(" ", "T"), "ns"))
        except ValueError:
            raise FastsimError(f"{where}: TIMESTAMP = {row['TIMESTAMP']!r} is not a date and time") from None
        prompt.append(_count(row["ContextTokens"], where, "ContextTokens"))
        output.append(_count(row["GeneratedTokens"], where, "GeneratedTokens"))
    t = np.array(stamps, dtype="datetime64[ns]")
    arrival = (t - t.min()).astype(np.int64) / 1e9 if t.size else np.zeros(0)
    return TraceRows(arrival, np.array(prompt, np.int64), np.array(output, np.int64))


def read_mooncake(path: Path, block_tokens: int = 512) -> TraceRows:
    """Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids (512-token blocks)."""
    arrival, prompt, output, lens, ids = [], [], [], [], []
    try:
        fh = path.open()
    except OSError as e:
        raise FastsimError(f"trace: cannot open {str(path)!r} ({e.strerror})") from None
    with fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            where = f"{path}:{line}"
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise FastsimError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise FastsimError(f"{where}: expected a JSON object per line")
            for key in ("timestamp", "input_length", "output_length"):
                if key not in rec:
                    raise FastsimError(f"{where}: no {key!r} field (a Mooncake trace line has timestamp, "
                                       "input_length, output_length, hash_ids)")
            ts = rec["timestamp"]
            if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not np.isfinite(ts) or ts < 0:
                raise FastsimError(f"{where}: timestamp = {ts!r} must be milliseconds >= 0")
            arrival.append(ts / 1e3)
            prompt.append(_count(rec["input_length"], where, "input_length"))
            output.append(_count(rec["output_length"], where, "output_length"))
            h = rec.get("hash_ids", [])
            if not isinstance(h, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in h):
                raise FastsimError(f"{where}: hash_ids must be a list of integers")
            lens.append(len(h))
            ids.extend(h)
    arr = np.array(arrival, np.float64)
    return TraceRows(arr - (arr.min() if arr.size else 0.0), np.array(prompt, np.int64), np.array(output, np.int64),
                     np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), np.array(ids, np.int64), block_tokens)


def read_vidur(path: Path) -> TraceRows:
    """Vidur / etalon CSV: num_prefill_tokens, num_decode_tokens and, if present, arrived_at (s)."""
    rows = list(_csv_rows(path, ("num_prefill_tokens", "num_decode_tokens"), "Vidur"))
    has_time = bool(rows) and "arrived_at" in rows[0][1]
    arrival = []
    for where, row in rows:
        if has_time:
            try:
                t = float(row["arrived_at"])
            except ValueError:
                raise FastsimError(f"{where}: arrived_at = {row['arrived_at']!r} is not a number") from None
            if not np.isfinite(t) or t < 0:
                raise FastsimError(f"{where}: arrived_at = {row['arrived_at']!r} must be seconds >= 0")
            arrival.append(t)
    prompt = np.array([_count(r["num_prefill_tokens"], w, "num_prefill_tokens") for w, r in rows], np.int64)
    output = np.array([_count(r["num_decode_tokens"], w, "num_decode_tokens") for w, r in rows], np.int64)
    arr = np.array(arrival, np.float64) if has_time else None
    return TraceRows(None if arr is None else arr - (arr.min() if arr.size else 0.0), prompt, output)


def read_fastsim(path: Path) -> TraceRows:
    """A request table fastsim wrote (Parquet, Arrow or CSV): replays arrival_s, prompt_tokens,
    output_tokens. Rejected requests are replayed too: they were part of the offered load."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        elif path.suffix == ".arrow":
            table = ipc.open_file(pa.memory_map(str(path))).read_all()
        else:
            table = pacsv.read_csv(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise FastsimError(f"trace: cannot read {str(path)!r} as a fastsim request table "
                           f"({str(e).splitlines()[0]})") from None
    cols = ("arrival_s", "prompt_tokens", "output_tokens")
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise FastsimError(f"{path}: not a fastsim request table: no column {missing[0]!r}")
    if "engine" in table.column_names and table.num_rows:  # a multi-engine run: the workload once per engine
        engines = table.column("engine").cast(pa.string())
        table = table.filter(pc.equal(engines, engines[0].as_py()))
    arrival = table.column("arrival_s").to_numpy(zero_copy_only=False).astype(np.float64)
    prompt = table.column("prompt_tokens").to_numpy(zero_copy_only=False)
    output = table.column("output_tokens").to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(arrival) | (arrival < 0) | (prompt < 1) | (output < 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise FastsimError(f"{path}: row {row + 1} has arrival_s={arrival[row]!r}, prompt_tokens={prompt[row]!r}, "
                           f"output_tokens={output[row]!r}; arrivals must be >= 0 and token counts >= 1")
    order = np.argsort(arrival, kind="stable")
    return TraceRows(arrival[order], prompt[order].astype(np.int64), output[order].astype(np.int64))


READERS = {"azure": read_azure, "mooncake": read_mooncake, "vidur": read_vidur, "fastsim": read_fastsim}


def read_trace(fmt: str, path: str | Path) -> TraceRows:
    return READERS[fmt](Path(path))
