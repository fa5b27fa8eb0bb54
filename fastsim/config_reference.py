"""The configuration reference (docs/configuration.md), generated from the config schema so that it
cannot drift from what fastsim accepts: every section and key with its type, default and meaning."""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fastsim import config as C

# Sections in the order a config file is read, then the nested objects in the order they appear.
_TOP = [("simulation", C.Simulation), ("hardware", C.Hardware), ("engine", C.Engine), ("cluster", C.Cluster),
        ("workload", C.Workload), ("slo", C.Slo), ("output", C.Output), ("sweep", C.Sweep)]

_INTRO = """\
# Configuration reference

Generated from fastsim's config schema (`fastsim config-reference` prints it; a test keeps this file
in step). A config is one YAML file; `fastsim generate-config` writes a commented one with every
default, and `--set key=value` overrides any key from the command line (`engine.max_num_seqs=128`,
`workload.clients.0.arrival.rate=8`). Units are in the names: `_s` seconds, `_ms` milliseconds,
`_gb_s` gigabytes (10^9 bytes) per second, `_gib` 2^30 bytes, `_w` watts, `_usd` US dollars; token
counts are plain integers. Unknown keys are refused with the closest known one.

Top level: `model` (a catalog id from `fastsim models` or a path to a Hugging Face `config.json`;
default `meta-llama/Meta-Llama-3-8B`), `engines` (a list of named partial overrides of `engine`,
compared on one workload), and the sections below.
"""


def type_name(tp: Any) -> str:
    """A readable type: `int`, `a | b`, `list of X`, a nested object's name."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return " \\| ".join(type_name(a) for a in args) + (" \\| null" if optional else "")
    if origin in (list, tuple):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping {type_name(k)} -> {type_name(v)}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    if isinstance(tp, typing.ForwardRef) or isinstance(tp, str):
        name = tp.__forward_arg__ if isinstance(tp, typing.ForwardRef) else tp
        return f"[{name}](#{name.lower()})"
    return getattr(tp, "__name__", str(tp))


def _models_in(tp: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    if isinstance(tp, typing.ForwardRef):
        return [getattr(C, tp.__forward_arg__)]
    if origin is not None and origin is not Literal:
        return [m for a in typing.get_args(tp) for m in _models_in(a)]
    return []


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == {} or value == []:
        return f"`{value}`"
    return f"`{value}`"


def _constraints(field) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "min length")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return ", ".join(out)


def _doc(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip()
    if not doc or doc.startswith(("Usage docs", "A base class")):
        return ""
    return " ".join(line.strip() for line in doc.splitlines())


def _section(title: str, model: type[BaseModel]) -> list[str]:
    lines = [f"## {title}", ""]
    if doc := _doc(model):
        lines += [doc, ""]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, f in model.model_fields.items():
        kind = type_name(f.annotation)
        if c := _constraints(f):
            kind += f" ({c})"
        desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
        if not desc and name in ("process", "dist", "format") and typing.get_origin(f.annotation) is Literal:
            desc = "selects this form"
        lines.append(f"| `{name}` | {kind} | {_default(f)} | {desc} |")
    return lines + [""]


def config_reference() -> str:
    out = [_INTRO]
    seen: set[type] = set()
    queue: list[tuple[str, type[BaseModel]]] = list(_TOP)
    while queue:
        title, model = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        out += _section(title if title == model.__name__ else f"{title} ({model.__name__})", model)
        for f in model.model_fields.values():
            for m in _models_in(f.annotation):
                if m not in seen:
                    queue.append((m.__name__, m))
    return "\n".join(out).rstrip() + "\n"
