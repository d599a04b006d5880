"""Where a run's corpus comes from: the manifest named in the config, or the built-in demo corpus.

The demo corpus is one corpus source beside the adapters; the config only names it (``manifest=""``).
"""
from __future__ import annotations

from pathlib import Path

from voxlib.config import Config


def corpus_name(cfg: Config) -> str:
    """A short name for the corpus: the manifest folder's name, or the demo corpus' settings tag.

    The demo corpus lives in a folder named after its settings, so other demo settings never resume
    an unrelated run.
    """
    if cfg.manifest:
        return Path(cfg.manifest).absolute().parent.name
    from voxlib.demo import demo_tag

    return demo_tag(cfg)


def manifest_path(cfg: Config) -> Path:
    """The manifest to read; the demo corpus is built first when the config names none."""
    if cfg.manifest:
        return Path(cfg.manifest)
    from voxlib.demo import ensure_demo_corpus

    return ensure_demo_corpus(cfg)
