"""Where a run's corpus comes from, and where its run goes by default.

The corpus is the manifest named in the config, or the built-in demo corpus when it names none; the
demo corpus is one corpus source beside the adapters. The default run folder is named after the
corpus, so the run-folder contract itself never needs to know where corpora come from.
"""
from __future__ import annotations

from pathlib import Path

from voxlib.config import Config, outputs_dir
from voxlib.demo import demo_tag, ensure_demo_corpus


def corpus_name(cfg: Config) -> str:
    """A short name for the corpus: the manifest folder's name, or the demo corpus' settings tag.

    The demo corpus lives in a folder named after its settings, so other demo settings never resume
    an unrelated run.
    """
    if cfg.manifest:
        return Path(cfg.manifest).absolute().parent.name
    return demo_tag(cfg)


def manifest_path(cfg: Config) -> Path:
    """The manifest to read; the demo corpus is built first when the config names none."""
    if cfg.manifest:
        return Path(cfg.manifest)
    return ensure_demo_corpus(cfg)


def default_run_dir(cfg: Config) -> Path:
    """The run folder used when ``run_dir`` is "": ``outputs/runs/<corpus name>``, with ``-folds<K>``
    and ``-seeds<N>`` appended for a pooled folder (so a single run and an experiment never share one)."""
    suffix = (f"-folds{cfg.folds}" if cfg.folds > 1 else "") + (f"-seeds{cfg.seeds}" if cfg.seeds > 1 else "")
    return outputs_dir() / "runs" / (corpus_name(cfg) + suffix)
