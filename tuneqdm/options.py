"""A command's settings declared once: each field of a command's config dataclass carries its flag (help text,
choices, argparse details), and :func:`add_options` builds the command line from the fields, so a default or a help
text cannot differ between the Python API (``GenerateConfig(...)``) and ``tuneqdm generate``.

This module imports nothing from tuneqdm, so every layer's config may declare its fields with :func:`option`.
"""

from __future__ import annotations

from dataclasses import MISSING, field, fields

# a field's annotation (a string under ``from __future__ import annotations``) -> the argparse type of its flag
_TYPES = {"int": int, "float": float}
QUIET_HELP = "no progress bars or stage lines on stderr"  # every command's --quiet but train's
PARSER_KEYS = ("command", "func", "benchmark_command", "toy_command")  # what argparse adds beside the flags


def option(default=MISSING, help: str | None = None, *, default_factory=MISSING, flag: str | None = None,
           also: tuple = (), **argparse_kwargs):
    """A config field with its flag. ``flag``: the flag's spelling (default ``--NAME``; a name without dashes is a
    positional argument); a field without a default is a required flag. ``argparse_kwargs``: argparse's own
    (``choices``, ``metavar``, ``nargs``, ``action``, ``type``); ``also``: more flags that set the same field, as
    ``(flag, argparse_kwargs)`` pairs (``--no_quantized_cache``)."""
    meta = {"flag": flag, "help": help, "argparse": argparse_kwargs, "also": tuple(also)}
    return field(default=default, default_factory=default_factory, metadata={"option": meta})


def field_default(f):
    """A dataclass field's default (its factory's value for a list), or MISSING."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def add_options(parser, config: type) -> None:
    """One flag per field of ``config`` declared with :func:`option`, in field order; the flag's default is the
    field's own. A bool field is a switch (``store_true``) unless the field names another action."""
    for f in fields(config):
        meta = f.metadata.get("option")
        if meta is None:
            continue
        kwargs, default = dict(meta["argparse"]), field_default(f)
        name = meta["flag"] or f"--{f.name}"
        if default is not MISSING:
            kwargs["default"] = default
        elif name.startswith("-"):
            kwargs["required"] = True
        kind = str(f.type).removesuffix(" | None")
        if "action" not in kwargs and "type" not in kwargs:
            if kind == "bool":
                kwargs["action"] = "store_true"
            elif kind in _TYPES:
                kwargs["type"] = _TYPES[kind]
        if name.startswith("-") and name != f"--{f.name}":
            kwargs["dest"] = f.name
        parser.add_argument(name, help=meta["help"], **kwargs)
        for flag, extra in meta["also"]:
            parser.add_argument(flag, dest=f.name, **extra)


def settings(args) -> dict:
    """The parsed flags as a config's keyword arguments: every flag is a field (a config refuses any other key, so a
    flag without a field fails loudly instead of being dropped)."""
    return {k: v for k, v in vars(args).items() if k not in PARSER_KEYS}
