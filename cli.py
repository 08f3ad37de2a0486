"""The command-line conventions every PreResQ tool shares: flags declared once beside their config
field, help that shows each default once, and one voice for errors and warnings.

    @dataclass
    class Config:
        lr: float = flag(None, float, "AdamW learning rate", "GRPO")

    add_flags(parser, Config, default_text)   # --lr, grouped, with its help and default
"""
from __future__ import annotations

import argparse
from dataclasses import field, fields


def flag(default, type_, help: str, group: str, **argparse_options):
    """A dataclass field and its command-line flag: one place for the default, the type and the help."""
    return field(default=default, metadata=dict(type=type_, help=help, group=group, **argparse_options))


def add_flags(parser: argparse.ArgumentParser, config_class, default_text=lambda name: "") -> None:
    """One flag per field of `config_class` (declared with `flag`), in argument groups.

    Booleans: a field defaulting to True gets --no-NAME (its help says what that flag does), one
    defaulting to False gets --NAME, one
    defaulting to None (decided later, e.g. by the model) gets both. default_text(name) describes a
    default that depends on other flags; otherwise a non-None default is shown as "(default: X)".
    """
    groups = {}
    for f in fields(config_class):
        m = f.metadata
        group = groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        name = "--" + f.name.replace("_", "-")
        if m["type"] is bool:
            if f.default is None:
                group.add_argument(name, action=argparse.BooleanOptionalAction, help=m["help"] + default_text(f.name))
            elif f.default:
                group.add_argument(f"--no-{name[2:]}", dest=f.name, action="store_false", help=m["help"])
            else:
                group.add_argument(name, action="store_true", help=m["help"])
            continue
        shown = default_text(f.name) or (f" (default: {f.default})" if f.default is not None else "")
        group.add_argument(name, type=m["type"], default=f.default, choices=m.get("choices"), help=m["help"] + shown)
