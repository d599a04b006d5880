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

import pandas as pd
from IPython.display import Markdown, display

from voxlib.config import Config, ConfigError, project_root
from voxlib.corpora.source import default_run_dir
from voxlib.demo import ensure_demo_corpus
from voxlib.plots import shown, styled
from voxlib.progress import send_to_report
from voxlib.runfolder import RunError, load_study, require_finished
from voxlib.text import markdown

PATH_FIELDS = ("manifest", "run_dir", "compare_run_dir", "study_dir", "cache_dir")  # str fields naming files/folders
# notebook 03's headline table as data, beside its HTML, in the executed notebook: index.html reads it
HEADLINE_MIME = "application/vnd.vox.headline+json"



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
    send_to_report()  # training's log lines to the terminal of `python -m voxlib.report` too
    cfg = resolve_paths(cfg)
    if need == "manifest":
        if not cfg.manifest:
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
        if cfg.study_dir:
            try:
                load_study(cfg.study_dir)
            except RunError as err:
                raise ConfigError(f"parameter 'study_dir': {err}") from None
    else:
        raise ValueError(f"need must be 'manifest' or 'run', got {need!r}")
    return cfg


def escape_markdown(text: object) -> str:
    """A corpus label made safe to paste into Markdown: no HTML, no accidental formatting (text.markdown)."""
    return markdown(text)


def bullets(lines) -> Markdown:
    """Sentences (findings, notes) as a Markdown list: they wrap like text in a report, where printed lines
    would run on in a fixed-width block. Corpus text in them is escaped (escape_markdown)."""
    return Markdown("\n".join(f"- {escape_markdown(line)}" for line in lines))


def as_table(values: dict, name: str = "value"):
    """A flat dict of numbers and names as a one-column table (reads better than a dict repr).

    Each value is shown as every table shows it (plots.shown): shares (the keys plots.SHARE_COLUMNS
    names: accuracies, majority, chance ...) as percent with one decimal, counts as integers, other
    numbers in fixed notation.
    """
    return pd.Series({k: shown(k, v) for k, v in values.items()}, name=name, dtype=object).to_frame()


def publish_headline(table, caption: str = ""):
    """Show verdict.headline's table and store it as data (HEADLINE_MIME) in the same output, so that
    index.html repeats exactly what notebook 03 shows without recomputing the reference baselines."""
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}  # NaN is not JSON
            for row in table.to_dict("records")]
    display({"text/html": styled(table, caption=caption).to_html(),
             HEADLINE_MIME: {"columns": list(table.columns), "rows": rows}}, raw=True)
