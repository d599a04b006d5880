"""Every knob of a vox run in one dataclass.

The same field names are the CLI flags of ``python -m voxlib.train`` (``--batch-size`` for
``batch_size``) and the papermill parameters of the notebooks (``-p batch_size 32``), so one value
means one thing everywhere. Defaults are the CPU-friendly demo settings; ``preset="seed"`` gives the
2019 protocol (full width, batch 10, lr 1e-5, 1000 epochs) for a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable


class ConfigError(ValueError):
    """A parameter with an unknown name, a wrong type or an impossible value."""


def project_root() -> Path:
    """The checkout that holds voxlib (editable install), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def outputs_dir() -> Path:
    """Where run artefacts go: ``$VOX_OUTPUTS`` or ``<project>/outputs``."""
    return Path(os.environ.get("VOX_OUTPUTS") or project_root() / "outputs")


def usable_cores() -> int:
    """CPU cores this process may run on (a batch job's share, not the whole node), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_run_dir(cfg: "Config") -> Path:
    """The run folder used when ``run_dir`` is "": ``outputs/runs/<corpus name>``.

    The corpus name is the manifest's folder name; the built-in corpus lives in a folder named after
    its settings (voxlib.demo.demo_tag), so other demo settings never resume an unrelated run.
    """
    if cfg.manifest:
        return outputs_dir() / "runs" / Path(cfg.manifest).absolute().parent.name
    from voxlib.demo import demo_tag  # demo imports this module

    return outputs_dir() / "runs" / demo_tag(cfg)


# The 2019 experiment, for a GPU: apply with Config(preset="seed") or --preset seed.
SEED_PRESET: dict[str, Any] = dict(width=1.0, batch_size=10, lr=1e-5, epochs=1000, optimizer="rmsprop")

CHOICES: dict[str, tuple[str, ...]] = {
    "preset": ("", "seed"),
    "on_bad_file": ("stop", "skip"),
    "feature": ("linear", "mel"),
    "optimizer": ("rmsprop", "adam"),
    "class_balance": ("", "loss", "sampler"),
    "nan_policy": ("stop", "skip"),
    "precision": ("auto", "fp32", "bf16"),
    "split_by": ("recording", "utterance"),
    "device": ("auto", "cpu", "cuda", "mps"),
}


@dataclass
class Config:
    # --- corpus -------------------------------------------------------------------------------
    manifest: str = ""  # CSV path,speaker,birthplace,sex[,...]; "" = the built-in demo corpus
    run_dir: str = ""  # run folder; "" = outputs/runs/<corpus name>; an existing run is resumed
    compare_run_dir: str = ""  # notebook 03: a second run folder shown side by side; "" = none
    cache_dir: str = ""  # feature cache root; "" = outputs/cache
    labels: str = "speaker,birthplace,sex"  # heads to train (comma list); "" = every label column
    on_bad_file: str = "stop"  # stop at the first bad clip, or skip it and list it in rejected.csv
    allow_outside_paths: bool = False  # allow manifest paths that escape its folder via '..'

    # --- built-in demo corpus (espeak-ng accents) ----------------------------------------------
    demo_speakers_per_accent: int = 6  # half female, half male
    demo_utterances: int = 40  # utterances per speaker
    demo_accents: str = ""  # comma list of accents (us, gb-rp, scotland, ... or espeak voices); "" = all eight
    demo_voice_spread: float = 1.0  # 1 = full pitch/formant ranges; smaller = more alike voices
    demo_seed: int = 0

    # --- features: clip -> 1x256x256 in [0,1] ------------------------------------------------
    sample_rate: int = 16000
    n_fft: int = 510  # 256 frequency bins
    hop_length: int = 125  # 256 frames = 2.0 s
    n_frames: int = 256
    feature: str = "linear"  # linear STFT magnitude, or 256 mel bands
    top_db: float = 80.0  # dB range kept below a full-scale sine (0 dB), mapped to [0,1]
    eval_crops: int = 3  # fixed, evenly spaced crops averaged at evaluation

    # --- splits -------------------------------------------------------------------------------
    val_fraction: float = 0.1  # per speaker, share of utterances for seen-speaker validation
    test_fraction: float = 0.1  # per speaker, share of utterances for seen-speaker test
    unseen_per_class: int = 1  # whole speakers per birthplace class held out as unseen
    unseen_min_speakers: int = 3  # only classes with at least this many speakers give one
    split_by: str = "recording"  # segments of one file stay together; "utterance" splits them (CSJ IPUs)

    # --- model --------------------------------------------------------------------------------
    width: float = 0.25  # channel multiplier; 1.0 = the seed's 64..2048 channels

    # --- optimisation -------------------------------------------------------------------------
    preset: str = ""  # "seed" = the 2019 protocol (see SEED_PRESET); explicit fields still win
    epochs: int = 8  # the demo clears every majority baseline by far after 3; 8 fits make demo in ~10 min
    batch_size: int = 32
    lr: float = 1e-4
    optimizer: str = "rmsprop"
    seed: int = 0
    head_weights: str = ""  # per-head loss weights, e.g. "birthplace=2,sex=0.5" (default 1)
    class_balance: str = ""  # for balanced_head: "loss" (inverse-frequency weights) or "sampler"
    balanced_head: str = "birthplace"
    label_smoothing: float = 0.0
    nan_policy: str = "stop"  # on a NaN/inf loss: stop with the batch's files, or skip the batch
    grad_log_every: int = 10  # steps between per-head gradient-norm measurements (0 = never)

    # --- hardware -----------------------------------------------------------------------------
    device: str = "auto"  # cuda > mps > cpu
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True  # NHWC tensors: ~1.3x faster CPU training at width 0.25 (measured), also good on GPUs
    compile: bool = False
    num_workers: int = -1  # data-loader workers; -1 = a sensible number for the device
    threads: int = 0  # torch intra-op threads; 0 = torch's default

    # -------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = _field_type(f)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(
                    f"parameter {f.name!r} must be {want.__name__}, got {type(value).__name__} {value!r}"
                )
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"parameter {name!r} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ("epochs", "batch_size", "n_fft", "hop_length", "n_frames", "sample_rate", "eval_crops")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"parameter {name!r} must be positive, got {getattr(self, name)!r}")
        if not (self.width > 0 and self.lr > 0 and self.top_db > 0):
            raise ConfigError("parameters 'width', 'lr' and 'top_db' must be positive")
        if not 0 <= self.val_fraction + self.test_fraction < 1:
            raise ConfigError("val_fraction + test_fraction must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("label_smoothing must be in [0, 1)")
        self.head_weight_map()  # parse errors surface now, not mid-run

    # --- derived values -----------------------------------------------------------------------
    def head_names(self) -> list[str]:
        return [h.strip() for h in self.labels.split(",") if h.strip()]

    def head_weight_map(self) -> dict[str, float]:
        weights: dict[str, float] = {}
        for item in filter(None, (s.strip() for s in self.head_weights.split(","))):
            name, sep, value = item.partition("=")
            try:
                weights[name.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise ConfigError(f"head_weights item {item!r} is not name=number")
        return weights

    def demo_accent_list(self) -> list[str]:
        return [a.strip() for a in self.demo_accents.split(",") if a.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Build from plain values (papermill, JSON); an unknown name is an error, not a no-op."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown parameter(s) {unknown}; known: {sorted(known)}")
        preset = values.get("preset", "")
        base = dict(SEED_PRESET) if preset == "seed" else {}
        return cls(**{**base, **values})

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any], defaults: Iterable[str] = ()) -> "Config":
        """Build from a notebook's globals: every public plain value counts as a parameter.

        Papermill injects unknown ``-p`` names as variables without complaint; collecting every
        public value catches them here, in the notebook's first cell.
        """
        skip = {"In", "Out", "get_ipython", "exit", "quit", "open"}
        values = {
            k: v
            for k, v in namespace.items()
            if not k.startswith("_") and k not in skip and not callable(v)
            and not isinstance(v, types.ModuleType)
        }
        return cls.from_dict(values)

    @classmethod
    def from_json(cls, path: str | Path) -> "Config":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls.from_dict({k: v for k, v in data.items() if k in known})

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(description="vox run settings (fields of voxlib.config.Config)")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            want = _field_type(f)
            if want is bool:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
            else:
                parser.add_argument(flag, dest=f.name, type=want, default=None,
                                    choices=CHOICES.get(f.name), metavar=want.__name__.upper())
        return parser

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "Config":
        args = cls.parser().parse_args(argv)
        return cls.from_dict({k: v for k, v in vars(args).items() if v is not None})


def _field_type(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]
