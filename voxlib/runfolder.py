"""The run-folder contract: file names, columns, how each file is written and read (no torch)."""
from __future__ import annotations

from pathlib import Path

from voxlib.config import Config, outputs_dir
from voxlib.corpora.source import corpus_name


def default_run_dir(cfg: Config) -> Path:
    """The run folder used when ``run_dir`` is "": ``outputs/runs/<corpus name>``."""
    return outputs_dir() / "runs" / corpus_name(cfg)
