"""A verb's flags, declared once: an options dataclass whose fields are the flags.

Each field is one flag (or positional argument); its type, default and help live on the field, so
the parser, the verb's function and any caller read the same declaration::

    @dataclass
    class Options:
        run_dir: str = flag(positional=True, help="a run directory")
        max_tokens: int = flag(200, help="tokens to generate")
        stop: list[str] | None = flag(None, append=True, metavar="STR", help="repeatable")

A field with ``config="train.max_steps"`` also sets that config key when the flag is given
(:func:`config_values`): flags set the config directly, not through ``--set`` strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

REQUIRED = dataclasses.MISSING


def flag(default: Any = None, *, help: str = "", positional: bool = False, required: bool = False,
         append: bool = False, choices=None, metavar: str | None = None, nargs=None, negatable: bool = False,
         config: str | None = None, group: str | None = None, name: str | None = None):
    """A dataclass field that is one command-line flag (see the module docstring)."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, positional=positional, required=required, append=append, choices=choices, metavar=metavar,
        nargs=nargs, negatable=negatable, config=config, group=group, name=name))


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (list, tuple):
        return typing.get_args(tp)[0]
    if args:
        return _base_type(args[0])
    return tp


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of ``cls`` to ``parser``."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        m = f.metadata
        target = parser
        if m.get("group"):
            target = groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        tp = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"help": m.get("help") or None}
        if m.get("metavar"):
            kwargs["metavar"] = m["metavar"]
        if m.get("choices"):
            kwargs["choices"] = m["choices"]
        if m.get("nargs"):
            kwargs["nargs"] = m["nargs"]
        if m.get("positional"):
            target.add_argument(f.name, type=tp, **kwargs)
            continue
        names = [m.get("name") or "--" + f.name.replace("_", "-")]
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if m.get("negatable") else "store_true"
            kwargs["default"] = f.default
        else:
            kwargs.update(type=tp, default=f.default)
            if m.get("append"):
                kwargs["action"] = "append"
            if m.get("required"):
                kwargs["required"] = True
        target.add_argument(*names, dest=f.name, **kwargs)


def from_args(cls: type, args: argparse.Namespace):
    """The options dataclass filled from parsed ``args``."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def config_values(opts) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` for the fields with a ``config`` key that the command line gave
    (not None, not a false switch)."""
    out: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(opts):
        key, value = f.metadata.get("config"), getattr(opts, f.name)
        if key and value is not None and value is not False:
            section, _, name = key.partition(".")
            out.setdefault(section, {})[name] = value
    return out
