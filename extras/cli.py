"""extras/cli.py: a command line made from a config dataclass, its --help from the fields' comments.

Why it exists: train.py's settings are one dataclass (TrainConfig), which is what a learner reads; a
user also wants every field as a flag, a typo refused before anything loads, and a --help that says
what each setting means. This file builds all of that from the dataclass itself, so the settings are
written once.

What it holds: field_help (the comment after each field, with its continuation lines) and parse (the
argparse parser of a dataclass: one flag per field, --no-FLAG for booleans, lists space-separated, a
fixed set of values where given, and presets such as train.py's --paper that apply unless a flag
says otherwise), with TRAIN_CHOICES, train.py's settings that take one of a fixed set of values.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys

import common
import fusellm
from extras import successors

# train.py's settings with a fixed set of values: a typo is refused by the command line, before
# anything loads.
TRAIN_CHOICES = {"fusion": fusellm.FUSIONS, "avg_weights": fusellm.AVG_WEIGHTS,
                 "ce_unit": ("token", "byte"), "fusion_loss": successors.LOSSES}


def field_help(cls) -> dict[str, str]:
    """The comment written after each field of the dataclass (with its continuation lines, the
    comments below it in the same column), which --help shows."""
    helps, name, column = {}, None, -1
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"^\s+(\w+): \w+ = [^#\n]*#(.*)$", line)
        more = re.match(r"^(\s+)#(.*)$", line)
        if field:
            name, column = field.group(1), line.index("#")
            helps[name] = field.group(2).strip()
        elif more and name and len(more.group(1)) == column:
            helps[name] += " " + more.group(2).strip()
        else:
            name = None
    return helps


def parse(cls, argv, description: str, choices: dict, presets: dict):
    """An instance of the dataclass `cls` from the command line (argv None: sys.argv). `choices`:
    the fields with a fixed set of values; `presets`: {boolean field: {field: value}}, applied when
    the flag is on, except to the fields the command line sets explicitly."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        flag, what = f"--{f.name.replace('_', '-')}", helps.get(f.name, "")
        if f.type == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=f.default, help=what)
        elif f.type == "tuple":   # a list: --sources A B (space-separated, as in every script)
            p.add_argument(flag, dest=f.name, nargs="+", default=f.default, help=what)
        else:
            cast = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(flag, dest=f.name, type=cast, default=f.default,
                           choices=choices.get(f.name), help=f"{what} (default {f.default!r})")
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    explicit = {a.dest for a in p._actions if any(s in given for s in a.option_strings)}
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    for flag, preset in presets.items():
        if getattr(cfg, flag):
            cfg = dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in explicit})
    if getattr(cfg, "online", False):      # the sources' output heads run in the loop (fast_head)
        from extras import fast_head
        try:
            # NANOFUSE_HEAD: a typo (or a mode this device cannot run) named before anything loads
            fast_head.head_mode(common.device(cfg.device).startswith("cuda"))
        except ValueError as e:
            p.error(str(e))
    return cfg
