"""The first cells of every notebook: parameters -> a checked Config, paths resolved one way.

A notebook may run under papermill (kernel in whatever folder papermill was started from), under
``voxlib.report`` (kernel in ``notebooks/``, absolute paths) or in Jupyter (kernel in
``notebooks/``). So that one parameter value means one file in all three, a *relative* path in a
notebook parameter is resolved against the project root (the checkout holding ``voxlib``), never
against the kernel's working directory.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from voxlib.config import Config, ConfigError, project_root
from voxlib.runfolder import RunError, default_run_dir, require_finished
from voxlib.text import markdown

PATH_FIELDS = ("manifest", "run_dir", "compare_run_dir", "cache_dir")  # str fields naming files/folders



def resolve_paths(cfg: Config, base: Path | None = None) -> Config:
    """Make every non-empty path field absolute, relative ones against ``base`` (project root)."""
    base = Path(base) if base is not None else project_root()
    changes = {}
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value:
            path = Path(value).expanduser()
            changes[name] = str(path if path.is_absolute() else (base / path).resolve())
    return dataclasses.replace(cfg, **changes)


def prepare(cfg: Config, need: str = "manifest", allow_unfinished: bool = False) -> Config:
    """Check what a notebook needs before any slow cell runs; return the Config with paths resolved.

    ``need="manifest"``: the manifest must exist; "" builds the demo corpus first (slow once).
    ``need="run"``: the run folder (and ``compare_run_dir`` if given) must hold a finished run, or a
    finished pooled folder (folds or seeds) for ``run_dir``: finished as runfolder.require_finished
    decides for every reader; ``allow_unfinished`` reads an unfinished one as it is, with a warning.
    """
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets
    cfg = resolve_paths(cfg)
    if need == "manifest":
        if not cfg.manifest:
            from voxlib.demo import ensure_demo_corpus

            cfg = dataclasses.replace(cfg, manifest=str(Path(ensure_demo_corpus(cfg)).resolve()))
        if not Path(cfg.manifest).is_file():
            raise ConfigError(f"parameter 'manifest': no such file {cfg.manifest}")
    elif need == "run":
        if not cfg.run_dir:
            cfg = dataclasses.replace(cfg, run_dir=str(default_run_dir(cfg)))
        for name in ("run_dir", "compare_run_dir"):
            folder = getattr(cfg, name)
            if not folder:
                continue
            try:
                require_finished(Path(folder), allow_unfinished)
            except RunError as err:
                hint = "; train first (notebook 02 or python -m voxlib.train)" if not Path(folder).exists() else ""
                raise ConfigError(f"parameter {name!r}: {err}{hint}") from None
    else:
        raise ValueError(f"need must be 'manifest' or 'run', got {need!r}")
    return cfg


def escape_markdown(text: object) -> str:
    """A corpus label made safe to paste into Markdown: no HTML, no accidental formatting (text.markdown)."""
    return markdown(text)


def as_table(values: dict, name: str = "value"):
    """A flat dict of numbers and names as a one-column table (reads better than a dict repr).

    Shares (the keys plots.SHARE_COLUMNS names: accuracies, majority, chance ...) read as percent with
    one decimal, like every other table; other floats to 4 significant digits.
    """
    import pandas as pd

    from voxlib.plots import SHARE_COLUMNS
    from voxlib.text import PERCENT

    def shown(key, value):
        if isinstance(value, float):
            return PERCENT.format(value) if key in SHARE_COLUMNS else f"{value:.4g}"
        return value

    return pd.Series({k: shown(k, v) for k, v in values.items()}, name=name, dtype=object).to_frame()
