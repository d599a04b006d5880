"""Command-line flags generated from the Config fields: one list of knobs, one meaning per flag."""
from __future__ import annotations

import argparse
from typing import Sequence

from voxlib.config import GROUPS, Config, _field_type, field_info


def add_config_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One ``--flag`` per Config field (``batch_size`` -> ``--batch-size``), grouped like config.py."""
    sections = {g: parser.add_argument_group(g) for g in GROUPS}
    for f in field_info():
        if only is not None and f.name not in only:
            continue
        meta, flag, want = f.metadata, "--" + f.name.replace("_", "-"), _field_type(f)
        text = f"{meta['help']} (default: {f.default!r})"
        group = sections[meta["group"]]
        if want is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, dest=f.name, type=want, default=None, choices=meta["choices"],
                               metavar=want.__name__.upper(), help=text)


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config of the flags given (those left out keep their defaults)."""
    names = {f.name for f in field_info()}
    return Config.from_dict({k: v for k, v in vars(args).items() if k in names and v is not None})


def parse_config(argv: Sequence[str] | None = None, prog: str = "python -m voxlib.train",
                 description: str = "") -> Config:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))
