"""Where the compiled engine's time goes, by source line: a sampling profile of one fast-mode run.

Numba's JIT code has no symbols for `perf`, so this compiles the engine once more with line tables
(NUMBA_DEBUGINFO, into its own cache: the project's cache is untouched; ~3-10 min after an engine change),
records the run with `perf record`, and maps each sample inside the compiled kernel to a line
through the kernel's object code (taken from that cache) and `addr2line`.

Numba inlines `inline="always"` functions before LLVM sees them, and their lines keep the callee's
line numbers under the caller's file name. So the profiled build runs a copy of the package whose
engine files are shifted apart (file i's line n becomes (i + 1) * LINE_STRIDE + n): every line then
names one engine function, and the report adds the lines up by function too.

With --counts it counts instead of sampling: the run goes under valgrind's callgrind, which
counts every instruction the kernel executes and every conditional branch its simple predictor
model mispredicts. Counts are the same from run to run, where times on a shared machine swing by
more than the change being measured; they are per request and by line. (The code is compiled for a
fixed CPU, haswell, that valgrind can run, into a cache of its own; valgrind is ~50x slower, hence
20,000 requests by default.)

Usage: python bench/profile_engine.py [--requests 300000] [--dataset sharegpt] [--mode fast]
       [--load 0.8] [--replicas 1] [--prefix-caching] [--variant plain] [--top 40] [--counts]
Needs Linux `perf` (perf_event_paranoid <= 2), or valgrind for --counts, and binutils
(`addr2line`, `objcopy`).
"""
from __future__ import annotations

import argparse
import ast
import collections
import ctypes
import glob
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "fastsim" / "engine"


def _engine_cache(kind: str) -> Path:
    """This build's cache directory, named by a digest of the engine's sources. Numba checks only
    the compiled function's own file: after an edit to a function it inlines from another module,
    a fixed directory would hand back the old code, and the counts would measure it unchanged.
    Directories of other digests are removed."""
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in sorted(ENGINE.glob("*.py")))).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"fastsim-{kind}-cache-{digest}"
    for old in glob.glob(str(path.parent / f"fastsim-{kind}-cache*")):
        if old != str(path):
            shutil.rmtree(old, ignore_errors=True)
    return path


LINE_STRIDE = 100_000  # engine files are shorter: the line number says which file
ENGINE_FILES = sorted(ENGINE.glob("*_nb.py"))


def shifted_copy(cache: Path) -> Path:
    """A copy of the `fastsim` package beside `cache`, its engine files shifted apart, made afresh
    each run (the rest of the package may have changed since the digest's first run). Each file
    keeps its original's modification time, so that Numba finds the shifted engine's compiled code
    again (it keys that by path and modification time; the digest names the engine's version)."""
    root = cache / "src"
    shutil.copytree(ROOT / "fastsim", root / "fastsim", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)  # (copies keep modification times)
    for i, path in enumerate(ENGINE_FILES):
        target = root / "fastsim" / "engine" / path.name
        target.write_text("\n" * ((i + 1) * LINE_STRIDE) + path.read_text())
        stat = path.stat()
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return root


def source_line(line: int) -> tuple[str, int] | None:
    """(engine file stem, line) of a line number in the shifted copy; None outside the engine files."""
    i, n = divmod(line, LINE_STRIDE)
    return (ENGINE_FILES[i - 1].stem, n) if 1 <= i <= len(ENGINE_FILES) else None


KERNEL_CACHE_FILE = "cluster_nb.run_cluster_nb-*.nbc"
# --counts: a CPU valgrind emulates (it has no AVX-512), named, so that the native compile and the
# run under valgrind find the same cached code (Numba keys its cache by the CPU it compiled for).
COUNTS_CPU = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": (
    "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+popcnt,+sse,+sse2,"
    "+sse3,+sse4.1,+sse4.2,+ssse3,+sahf")}


def _keep_inlining() -> None:
    """Under NUMBA_DEBUGINFO Numba marks every function noinline, which would profile a different
    program: put LLVM's inlining back, keeping the line tables."""
    import numba.core.lowering as lowering

    pre_lower = lowering.BaseLower.pre_lower

    def patched(self):
        pre_lower(self)
        self.builder.function.attributes.discard("noinline")

    lowering.BaseLower.pre_lower = patched


def child(args: argparse.Namespace, dump: str) -> None:
    """Run under perf: warm up (compile), run the measured simulation, dump the JIT code's mapping."""
    _keep_inlining()
    sys.path.insert(0, str(ROOT / "bench"))
    import speed  # the speed benchmark's scenario, so the two measure the same thing
    from fastsim.config import Config
    from fastsim.simulation import simulate

    rate = args.rate or args.load * speed.capacity(args.dataset, args.variant)  # (measured outside the profile)
    import fastsim

    print(json.dumps({"rate": rate, "package": fastsim.__file__}), flush=True)
    cfg = speed.with_variant(json.loads(json.dumps(speed.BASE)), args.variant)
    cfg["simulation"]["mode"] = args.mode
    cfg["workload"]["num_requests"] = args.requests
    cfg["workload"]["clients"][0]["dataset"]["name"] = args.dataset
    cfg["workload"]["clients"][0]["arrival"]["rate"] = \
        rate * args.replicas / speed.turns_per_arrival(args.variant)
    if args.replicas > 1:  # as bench/speed.py runs them: round-robin, each replica at the load
        cfg["engine"]["data_parallel_size"] = args.replicas
        cfg["cluster"] = {"router": "round_robin"}
    if args.prefix_caching:
        cfg["engine"]["enable_prefix_caching"] = True
    result = simulate(Config(**cfg))
    regions = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if "x" in parts[1] and len(parts) < 6:  # anonymous executable mappings: JIT code
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                regions.append((lo, hi, ctypes.string_at(lo, hi - lo)))
    with open(dump, "wb") as f:
        pickle.dump({"regions": regions, "engine_wall_s": result.summary["wall_time_s"]}, f)


def kernel_object(out: Path, cache: Path) -> Path:
    """The kernel's ELF object, cut out of Numba's cache file (a pickle holding the object code)."""
    files = glob.glob(str(cache / "*" / KERNEL_CACHE_FILE))
    if not files:
        sys.exit(f"profile_engine: no compiled kernel in {cache}: the profiled run did not compile it")
    data = Path(max(files, key=os.path.getmtime)).read_bytes()
    start = data.find(b"\x7fELF")
    section_table = struct.unpack_from("<Q", data, start + 0x28)[0]
    entry_size, entries = struct.unpack_from("<HH", data, start + 0x3A)
    out.write_bytes(data[start:start + section_table + entry_size * entries])
    return out


def engine_lines() -> dict[tuple[str, int], tuple[str, str]]:
    """(file stem, line) -> (function, code) for every line of the engine's functions."""
    lines = {}
    for path in ENGINE_FILES:
        text = path.read_text().splitlines()
        for node in ast.parse("\n".join(text)).body:
            if isinstance(node, ast.FunctionDef):
                for n in range(node.lineno, node.end_lineno + 1):
                    lines[(path.stem, n)] = (node.name, text[n - 1].strip())
    return lines


def kernel_region(regions: list, obj: Path) -> tuple[int, int]:
    """The mapping that holds the kernel: its code is the object's .ltext section from the mapping's
    start (relocated addresses aside, most 16-byte windows match)."""
    text = obj.with_suffix(".text")
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.ltext", str(obj), str(text)], check=True)
    code = text.read_bytes()

    def matches(region) -> int:
        mem = region[2]
        return sum(mem[i:i + 16] == code[i:i + 16] for i in range(0, min(len(code), len(mem)) - 16, 997))

    best = max(regions, key=matches)
    return best[0], best[1]


def print_lines(costs: dict[int, tuple], names: tuple[str, ...], obj: Path, top: int) -> None:
    """Each metric's share by engine function and by source line, sorted by the first metric;
    `costs` by offset in the kernel object's .ltext section."""
    keys = sorted(costs)
    out = subprocess.run(["addr2line", "-e", str(obj), "-j", ".ltext"] + [hex(k) for k in keys],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    code = engine_lines()
    by_line = collections.defaultdict(lambda: [0] * len(names))
    by_fn = collections.defaultdict(lambda: [0] * len(names))
    for k, loc in zip(keys, out):
        number = loc.rsplit(":", 1)[-1].split(" ")[0]
        where = source_line(int(number)) if number.isdigit() else None
        if where:
            label, fn = f"{where[0]}.py:{where[1]}", f"{where[0]}.{code.get(where, ('?',))[0]}"
        else:
            label, fn = "(no line)", "(no line: moves, spills, LLVM's own code)"
        for m, value in enumerate(costs[k]):
            by_line[label][m] += value
            by_fn[fn][m] += value
    totals = [max(sum(row[m] for row in by_line.values()), 1) for m in range(len(names))]

    def shares(row):
        return "  ".join(f"{100 * row[m] / totals[m]:5.1f}%" for m in range(len(names)))

    head = "  ".join(f"{name:>6}" for name in names)
    print(f"{head}  function (its own lines; what it inlines is counted where that is written)")
    for fn, row in sorted(by_fn.items(), key=lambda kv: -kv[1][0]):
        if row[0] > 0.002 * totals[0] or (len(row) > 1 and row[1] > 0.002 * totals[1]):
            print(f"{shares(row)}  {fn}")
    print(f"\n{head}  line")
    for label, row in sorted(by_line.items(), key=lambda kv: -kv[1][0])[:top]:
        stem, _, number = label.partition(".py:")
        hit = code.get((stem, int(number))) if number.isdigit() else None
        print(f"{shares(row)}  {label}" + (f"  {hit[0]}: {hit[1][:80]}" if hit else ""))


def report(samples: list[int], dump: dict, obj: Path, top: int) -> None:
    lo, hi = kernel_region(dump["regions"], obj)
    offsets = collections.Counter(ip - lo for ip in samples if lo <= ip < hi)
    in_kernel = sum(offsets.values())
    print(f"engine wall {dump['engine_wall_s']:.3f} s; samples: {len(samples):,} in the process, "
          f"{in_kernel:,} in the compiled kernel ({100 * in_kernel / max(len(samples), 1):.0f}%; the rest is "
          "workload sampling, tables, summaries and math library calls such as log)")
    print_lines({k: (c,) for k, c in offsets.items()}, ("share",), obj, top)


def read_callgrind(path: str) -> tuple[collections.Counter, dict[int, list[int]]]:
    """A callgrind file written with --dump-instr=yes: (Ir by function, [Ir, Bc, Bcm] by instruction
    address of the anonymous functions, which are the JIT code)."""
    names: dict[str, str] = {}
    events: list[str] = []
    positions = 1
    fn, skip = None, False
    last = [0, 0]
    fn_ir: collections.Counter = collections.Counter()
    costs: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0, 0])

    def position(tok: str, i: int) -> int:  # callgrind compresses positions: "*" same, "+n"/"-n" relative
        if tok == "*":
            return last[i]
        if tok[0] in "+-":
            return last[i] + int(tok, 0)
        return int(tok, 0)

    for line in open(path):
        if line.startswith(("fn=", "cfn=")):
            ident, _, name = line.rstrip("\n").partition("=")[2].partition(" ")
            if name:
                names[ident] = name
            if line.startswith("fn="):
                fn = names.get(ident, ident)
            continue
        if line.startswith("calls="):
            skip = True  # the next cost line is the call's inclusive cost
            continue
        if line.startswith("events:"):
            events = line.split()[1:]
            continue
        if line.startswith("positions:"):
            positions = len(line.split()) - 1
            continue
        if not line[:1].isdigit() and line[:1] not in ("+", "-", "*"):
            continue
        tok = line.split()
        for i in range(positions):
            last[i] = position(tok[i], i)
        if skip:
            skip = False
            continue
        if fn and fn.startswith("0x"):
            values = dict(zip(events, (int(x) for x in tok[positions:])))
            c = costs[last[0]]
            c[0] += values.get("Ir", 0)
            c[1] += values.get("Bc", 0)
            c[2] += values.get("Bcm", 0)
            fn_ir[fn] += values.get("Ir", 0)
    return fn_ir, costs


def counts(args: argparse.Namespace, cmd: list[str], env: dict, tmp: str, cache: Path) -> None:
    """Run the measured simulation under callgrind and print its counts per request and by line."""
    out = os.path.join(tmp, "callgrind.out")
    print(f"counting {args.requests:,} requests under callgrind (~50x slower than native)...", flush=True)
    subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes", "--dump-instr=yes",
                    "--branch-sim=yes", f"--callgrind-out-file={out}", "--"] + cmd, env=env, check=True,
                   stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    with open(cmd[cmd.index("--child") + 1], "rb") as f:
        dump = pickle.load(f)
    obj = kernel_object(Path(tmp) / "kernel.o", cache)
    base, end = kernel_region(dump["regions"], obj)  # the kernel's code, as mapped in that run

    def in_kernel(thread) -> int:
        return sum(c[0] for a, c in thread[1].items() if base <= a < end)

    # The kernel's thread (it runs without the GIL, in a thread of its own). Not simply the busiest
    # in JIT code: the interpreter's own unnamed code can outweigh a short run's kernel.
    _, costs = max((read_callgrind(p) for p in sorted(glob.glob(out + "-*"))), key=in_kernel)
    total = [sum(c[m] for c in costs.values()) for m in range(3)]
    n = args.requests
    print(f"per request: {total[0] / n:,.0f} instructions, {total[1] / n:,.0f} conditional branches, "
          f"{total[2] / n:,.1f} mispredicted (callgrind's predictor model; a real CPU's is better)")
    print_lines({a - base: (c[0], c[2]) for a, c in costs.items() if base <= a < end}, ("Ir", "Bcm"), obj, args.top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, help="default 300,000 (20,000 with --counts)")
    ap.add_argument("--dataset", default="sharegpt")
    ap.add_argument("--mode", default="fast", choices=("fast", "exact", "stepped"))
    ap.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of capacity")
    ap.add_argument("--replicas", type=int, default=1, help="data-parallel replicas (round-robin)")
    ap.add_argument("--prefix-caching", action="store_true", help="engine.enable_prefix_caching: true")
    ap.add_argument("--variant", default="plain", help="a variant row of bench/speed.py (its VARIANTS: sglang, "
                    "chat, ...), at that load of its own capacity")
    ap.add_argument("--top", type=int, default=40, help="lines to print")
    ap.add_argument("--counts", action="store_true",
                    help="count instructions and mispredicted branches under valgrind instead of sampling")
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.requests is None:
        args.requests = 20_000 if args.counts else 300_000
    if args.child:
        child(args, args.child)
        return
    for tool in ("valgrind" if args.counts else "perf", "addr2line", "objcopy"):
        if shutil.which(tool) is None:
            sys.exit(f"profile_engine: `{tool}` not found; install {'valgrind' if args.counts else 'linux perf'} and binutils")
    cache = _engine_cache("counts" if args.counts else "profile")
    env = dict(os.environ, NUMBA_DEBUGINFO="1", NUMBA_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join([str(shifted_copy(cache)), os.environ.get("PYTHONPATH", "")]))
    if args.counts:
        env.update(COUNTS_CPU)
    with tempfile.TemporaryDirectory() as tmp:
        dump, data = os.path.join(tmp, "jit.pkl"), os.path.join(tmp, "perf.data")
        cmd = [sys.executable, __file__, "--child", dump, "--requests", str(args.requests), "--dataset",
               args.dataset, "--mode", args.mode, "--load", str(args.load), "--replicas", str(args.replicas),
               "--variant", args.variant]
        cmd += ["--prefix-caching"] if args.prefix_caching else []
        print("compiling with line tables (after an engine change: ~3-10 min), measuring the capacity...", flush=True)
        first = subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, text=True).stdout
        info = json.loads(first.strip().splitlines()[-1])
        if not info["package"].startswith(str(cache)):
            sys.exit(f"profile_engine: the profiled run imported {info['package']}, not the shifted copy in {cache}")
        rate = info["rate"]
        if args.counts:
            counts(args, cmd + ["--rate", str(rate)], env, tmp, cache)
            return
        print(f"recording {args.requests:,} requests at {rate:.3f} req/s...", flush=True)
        subprocess.run(["perf", "record", "-q", "-o", data, "--"] + cmd + ["--rate", str(rate)], env=env,
                       check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        script = subprocess.run(["perf", "script", "-i", data, "-F", "ip"], capture_output=True, text=True,
                                check=True).stdout
        samples = [int(x, 16) for x in script.split()]
        with open(dump, "rb") as f:
            report(samples, pickle.load(f), kernel_object(Path(tmp) / "kernel.o", cache), args.top)


if __name__ == "__main__":
    main()
