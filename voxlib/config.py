"""Every knob of a vox run in one dataclass, each declared once with its meaning.

The same field names are the CLI flags of ``python -m voxlib.train`` (``--batch-size`` for
``batch_size``) and the papermill parameters of the notebooks (``-p batch_size 32``), so one value
means one thing everywhere. Each field carries its help text, its group (how ``--help`` lists it),
its allowed values and its *role*, which is what the rest of vox asks instead of keeping lists:

- ``features``: changes the cached spectrograms (part of the feature-cache key);
- ``learning``: changes what a run learns (a resumed run must match; the checkpoint records them);
- ``run``: may change between launches of one run (epochs may grow, hardware may differ).

Defaults are the CPU-friendly demo settings; ``preset="seed"`` gives the 2019 protocol (full width,
batch 10, lr 1e-5, 1000 epochs) for a GPU, resolved once here so every consumer sees the same values.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import subprocess
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

FEATURES, LEARNING, RUN = "features", "learning", "run"
GROUPS = ("corpus", "demo corpus", "features", "splits", "model", "optimisation", "generalisation", "hardware",
          "analysis")

# The 2019 experiment, for a GPU: Config(preset="seed") or --preset seed.
SEED_PRESET: dict[str, Any] = dict(width=1.0, batch_size=10, lr=1e-5, epochs=1000, optimizer="rmsprop")
# A birthplace head that holds on new voices: Config(preset="accent") or --preset accent. The birthplace
# head reads a network of its own that sees the spectral envelope (no pitch harmonics), time statistics
# of its map, and training crops with new voices (vocal-tract length, pitch, tempo); the speaker and
# sex heads keep the seed trunk. Chosen by the remedies study over speaker folds
# (python -m voxlib.remedies; docs/remedies.md has the numbers).
ACCENT_PRESET: dict[str, Any] = dict(accent_branch=6, input_lifter=30, pooled_heads="birthplace",
                                     perturb_formant=0.12, perturb_pitch=0.25, perturb_tempo=0.12,
                                     perturb_share=0.5)
PRESETS: dict[str, dict[str, Any]] = {"seed": SEED_PRESET, "accent": ACCENT_PRESET}
MODEL_INPUT = 256  # the discriminator sees 256 frequency bins x 256 frames
N_BLOCKS = 6  # the seed trunk's Conv+BatchNorm+LeakyReLU blocks (256 -> 4)
ACCENT_HEAD = "birthplace"  # the head the generalisation remedies (branch, adversary, envelope) serve


class ConfigError(ValueError):
    """A parameter with an unknown name, a wrong type or an impossible value."""


def knob(default: Any, help: str, group: str, role: str, choices: tuple | None = None,
         low: float | None = None, high: float | None = None) -> Any:
    """A Config field with everything a reader, the CLI and the resume check need to know about it."""
    assert group in GROUPS and role in (FEATURES, LEARNING, RUN)
    return field(default=default, metadata=dict(help=help, group=group, role=role, choices=choices,
                                                low=low, high=high))


@functools.lru_cache(maxsize=1)
def _checkout() -> Path | None:
    """The source checkout voxlib was imported from (it holds pyproject.toml), or None when installed."""
    here = Path(__file__).resolve().parent.parent
    try:
        return here if 'name = "voxlib"' in (here / "pyproject.toml").read_text(encoding="utf-8") else None
    except OSError:
        return None


def project_root() -> Path:
    """The checkout that holds voxlib (run from a checkout or an editable install), else the
    working directory (an installed package): relative notebook paths and outputs/ start here."""
    return _checkout() or Path.cwd()


def outputs_dir() -> Path:
    """Where run artefacts go: ``$VOX_OUTPUTS`` (every command's ``--outputs`` sets it), else
    ``outputs/`` of the checkout holding voxlib, else ``./outputs`` of the working directory."""
    return Path(os.environ.get("VOX_OUTPUTS") or project_root() / "outputs").expanduser()


def git_commit() -> str | None:
    """HEAD of the checkout voxlib runs from; None for an installed package.

    Git is asked about voxlib's own folder, and the answer counts only if that folder is the top of
    the work tree: an installed voxlib run from inside some other repository must not record that
    repository's commit as vox's.
    """
    root = _checkout()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None
    return lines[1]


def usable_cores() -> int:
    """CPU cores this process may run on (a batch job's share, not the whole node), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class Config:
    # --- corpus -------------------------------------------------------------------------------
    manifest: str = knob("", "CSV path,speaker,birthplace,sex[,...]; \"\" = the built-in demo corpus", "corpus", RUN)
    run_dir: str = knob("", "run folder; \"\" = outputs/runs/<corpus name>; an existing run is resumed", "corpus", RUN)
    compare_run_dir: str = knob("", "notebook 03: a second run folder shown side by side; \"\" = none", "analysis", RUN)
    study_dir: str = knob("", "notebook 03 and index.html: a remedies study folder (python -m voxlib.remedies) "
                          "shown as 'what makes birthplace hold on new voices'; \"\" = none", "analysis", RUN)
    cache_dir: str = knob("", "feature cache root; \"\" = outputs/cache", "corpus", RUN)
    labels: str = knob("speaker,birthplace,sex", "heads to train (comma list); \"\" = every label column",
                       "corpus", LEARNING)
    on_bad_file: str = knob("stop", "stop at the first bad clip, or skip it and list it in rejected_clips.csv",
                            "corpus", LEARNING, choices=("stop", "skip"))
    allow_outside_paths: bool = knob(False, "allow manifest paths that escape its folder via '..' or absolute paths",
                                     "corpus", LEARNING)
    speaker_labels: str = knob("birthplace,sex", "labels that must be the same on every row of a speaker (comma list)",
                               "corpus", LEARNING)
    label_conflicts: str = knob("stop", "a speaker whose rows disagree on a speaker label: stop, or take the "
                                "speaker's majority value and report it", "corpus", LEARNING,
                                choices=("stop", "majority"))

    # --- built-in demo corpus (espeak-ng accents) ----------------------------------------------
    demo_speakers_per_accent: int = knob(6, "speakers per accent (half female, half male)", "demo corpus", LEARNING,
                                         low=1, high=100)
    demo_utterances: int = knob(40, "utterances per speaker", "demo corpus", LEARNING, low=1, high=1000)
    demo_accents: str = knob("", "comma list of accents (us, gb-rp, scotland, ... or espeak voices); \"\" = all eight",
                             "demo corpus", LEARNING)
    demo_voice_spread: float = knob(1.0, "1 = full pitch/formant ranges; smaller = more alike voices",
                                    "demo corpus", LEARNING, low=0.0, high=1.0)
    demo_seed: int = knob(0, "seed of the demo corpus (voices, sentences, augmentation)", "demo corpus", LEARNING,
                          low=0)

    # --- features: clip -> 1x256x256 in [0,1] ------------------------------------------------
    sample_rate: int = knob(16000, "Hz; every clip is resampled to it", "features", FEATURES, low=4000, high=192000)
    n_fft: int = knob(510, "FFT size; linear features need 510 or 511 (256 bins), mel any size from 510",
                      "features", FEATURES, low=16, high=16384)
    hop_length: int = knob(125, "samples between frames (125 at 16 kHz: 256 frames = 2.0 s)", "features", FEATURES,
                           low=1, high=16384)
    n_frames: int = knob(256, "frames per crop; the discriminator takes 256", "features", LEARNING,
                         low=MODEL_INPUT, high=MODEL_INPUT)
    feature: str = knob("linear", "linear STFT magnitude, or 256 mel bands", "features", FEATURES,
                        choices=("linear", "mel"))
    top_db: float = knob(80.0, "dB range kept below a full-scale sine (0 dB), mapped to [0,1]", "features", FEATURES,
                         low=1.0, high=200.0)
    eval_crops: int = knob(3, "fixed, evenly spaced crops averaged at evaluation", "features", LEARNING, low=1, high=32)

    # --- splits -------------------------------------------------------------------------------
    val_fraction: float = knob(0.1, "per speaker, share of utterances for seen-speaker validation", "splits",
                               LEARNING, low=0.0, high=0.9)
    test_fraction: float = knob(0.1, "per speaker, share of utterances for seen-speaker test", "splits", LEARNING,
                                low=0.0, high=0.9)
    unseen_per_class: int = knob(1, "whole speakers per birthplace class held out as unseen", "splits", LEARNING,
                                 low=0, high=1000)
    unseen_min_speakers: int = knob(3, "only classes with at least this many speakers give one", "splits", LEARNING,
                                    low=2, high=1000)
    split_by: str = knob("recording", "segments of one file stay together; \"utterance\" splits them (CSJ IPUs)",
                         "splits", LEARNING, choices=("recording", "utterance"))
    folds: int = knob(1, "runs with disjoint unseen-speaker sets that together hold out every eligible speaker once",
                      "splits", LEARNING, low=1, high=100)
    fold: int = knob(0, "which of the folds this run holds out (0-based; set by the fold runner)", "splits",
                     LEARNING, low=0, high=99)
    seeds: int = knob(1, "repeat the run over this many training seeds (seed, seed+1, ...)", "splits", RUN,
                      low=1, high=100)

    # --- model --------------------------------------------------------------------------------
    width: float = knob(0.25, "channel multiplier; 1.0 = the seed's 64..2048 channels", "model", LEARNING,
                        low=1 / 64, high=4.0)

    # --- optimisation -------------------------------------------------------------------------
    preset: str = knob("", "\"seed\" = the 2019 protocol (width 1, batch 10, lr 1e-5, 1000 epochs, RMSprop); "
                       "\"accent\" = the generalisation remedies that make birthplace hold on new voices "
                       "(docs/remedies.md); fields given explicitly still win and are reported", "optimisation",
                       LEARNING, choices=("", *PRESETS))
    epochs: int = knob(8, "training epochs (may be raised to train on)", "optimisation", RUN, low=1, high=1_000_000)
    batch_size: int = knob(32, "global batch (split across processes)", "optimisation", LEARNING, low=1, high=8192)
    lr: float = knob(1e-4, "learning rate", "optimisation", LEARNING, low=1e-12, high=10.0)
    optimizer: str = knob("rmsprop", "optimiser", "optimisation", LEARNING, choices=("rmsprop", "adam"))
    seed: int = knob(0, "training seed: splits, initial weights, crops, batch order", "optimisation", LEARNING, low=0)
    head_weights: str = knob("", "per-head loss weights, e.g. \"birthplace=2,sex=0.5\" (default 1)", "optimisation",
                             LEARNING)
    class_balance: str = knob("", "for balanced_head: \"loss\" (inverse-frequency weights) or \"sampler\"",
                              "optimisation", LEARNING, choices=("", "loss", "sampler"))
    balanced_head: str = knob("birthplace", "the head class_balance applies to", "optimisation", LEARNING)
    label_smoothing: float = knob(0.0, "cross-entropy label smoothing", "optimisation", LEARNING, low=0.0, high=0.99)
    lr_schedule: str = knob("", "learning-rate schedule: cosine, onecycle, plateau; \"\" = constant",
                            "optimisation", LEARNING, choices=("", "cosine", "onecycle", "plateau"))
    warmup_epochs: int = knob(0, "epochs of linear learning-rate warm-up before the schedule", "optimisation",
                              LEARNING, low=0, high=10_000)
    freq_masks: int = knob(0, "SpecAugment: frequency masks per training crop", "optimisation", LEARNING,
                           low=0, high=16)
    freq_mask_width: int = knob(24, "SpecAugment: widest frequency mask (bins)", "optimisation", LEARNING,
                                low=1, high=MODEL_INPUT)
    time_masks: int = knob(0, "SpecAugment: time masks per training crop", "optimisation", LEARNING, low=0, high=16)
    time_mask_width: int = knob(32, "SpecAugment: widest time mask (frames)", "optimisation", LEARNING,
                                low=1, high=MODEL_INPUT)
    early_stop: str = knob("", "stop when SPLIT:METRIC (e.g. seen_val:acc, seen_val:loss) has not improved for "
                           "patience epochs; \"\" = never", "optimisation", RUN)
    patience: int = knob(5, "epochs without improvement before early_stop stops", "optimisation", RUN,
                         low=1, high=100_000)
    nan_policy: str = knob("stop", "on a NaN/inf loss: stop with the batch's files, or skip the batch",
                           "optimisation", RUN, choices=("stop", "skip"))
    grad_log_every: int = knob(10, "steps between per-head gradient-norm measurements (0 = never)",
                               "optimisation", RUN, low=0)

    # --- generalisation: a birthplace head that holds on new voices (each off by default) --------
    utterance_norm: bool = knob(False, "normalise each crop's frequency bins to zero mean and unit variance over time "
                                "inside the model (removes channel and a voice's average spectrum; predict applies "
                                "it too)", "generalisation", LEARNING)
    input_lifter: int = knob(0, "keep this many cepstral coefficients of every frame: the spectral envelope "
                             "without the pitch harmonics, which identify the voice rather than the accent "
                             "(inside the model; 0 = off)", "generalisation", LEARNING, low=0, high=MODEL_INPUT)
    pooled_heads: str = knob("", "heads (comma list) that read mean and std over time of the trunk map through one "
                             "linear layer instead of the 4x4 conv (no tie to positions in the crop)",
                             "generalisation", LEARNING)
    accent_branch: int = knob(0, "the birthplace head reads its own copy of the last N trunk blocks (0 = the shared "
                              "trunk, 6 = a network of its own, which alone reads the input_lifter envelope), so "
                              "remedies can act on it without touching the speaker head", "generalisation",
                              LEARNING, low=0, high=N_BLOCKS)
    accent_width: float = knob(0.0, "channel multiplier of the birthplace network of its own (accent_branch 6); "
                               "0 = the trunk's width", "generalisation", LEARNING, low=0.0, high=4.0)
    speaker_adversary: float = knob(0.0, "weight of the reversed gradient of a speaker classifier reading what the "
                                    "birthplace head reads (removes voice identity; 0 = off)", "generalisation",
                                    LEARNING, low=0.0, high=100.0)
    adversary_scope: str = knob("accent", "\"accent\": the adversary picks among the training speakers of the "
                                "utterance's birthplace (no push against accent); \"all\": among every one",
                                "generalisation", LEARNING, choices=("accent", "all"))
    adversary_warmup: int = knob(2, "epochs over which the adversary's weight rises linearly from 0",
                                 "generalisation", LEARNING, low=0, high=10_000)
    perturb_formant: float = knob(0.0, "voice perturbation: vocal-tract length, the spectral envelope's frequency "
                                  "axis scaled by a factor in [1/(1+x), 1+x] per training crop (0 = off)",
                                  "generalisation", LEARNING, low=0.0, high=0.5)
    perturb_pitch: float = knob(0.0, "voice perturbation: harmonic spacing (pitch) scaled by a factor in "
                                "[1/(1+x), 1+x], envelope kept (0 = off)", "generalisation", LEARNING,
                                low=0.0, high=1.0)
    perturb_tempo: float = knob(0.0, "voice perturbation: speaking rate scaled by a factor in [1/(1+x), 1+x] "
                                "(0 = off)", "generalisation", LEARNING, low=0.0, high=0.5)
    perturb_share: float = knob(0.5, "share of training crops given a new voice by the perturb_* settings; they "
                                "train no speaker or sex head (it is no longer the recorded voice)",
                                "generalisation", LEARNING, low=0.0, high=1.0)
    trunk_dropout: float = knob(0.0, "dropout on the maps the heads read, in training", "generalisation", LEARNING,
                                low=0.0, high=0.9)
    weight_decay: float = knob(0.0, "L2 weight decay on every conv and linear weight (not BatchNorm, not biases)",
                               "generalisation", LEARNING, low=0.0, high=1.0)

    # --- hardware -----------------------------------------------------------------------------
    device: str = knob("auto", "cuda > mps > cpu", "hardware", RUN, choices=("auto", "cpu", "cuda", "mps"))
    precision: str = knob("auto", "bf16 autocast on CUDA; on CPU auto measures fp32 and bf16 and takes the faster",
                          "hardware", LEARNING, choices=("auto", "fp32", "bf16"))
    channels_last: bool = knob(True, "NHWC tensors (faster on most CPUs and GPUs)", "hardware", RUN)
    compile: bool = knob(False, "torch.compile the trunk", "hardware", RUN)
    num_workers: int = knob(-1, "data-loader workers; -1 = a sensible number for the device", "hardware", RUN,
                            low=-1, high=256)
    threads: int = knob(0, "torch intra-op threads; 0 = torch's default", "hardware", RUN, low=0, high=1024)

    # --- analysis -----------------------------------------------------------------------------
    reference_baselines: bool = knob(True, "fit the reference baselines (MFCC statistics + logistic regression, and "
                                     "a pretrained speaker encoder when installed) on the run's split", "analysis", RUN)

    # -------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.preset_notes: list[str] = []
        self.validate()
        self._apply_preset()

    def _apply_preset(self) -> None:
        """Fields still at their default take the preset's value; explicit ones win and are noted.

        Applying it again to its own result changes nothing, so a resolved Config can be copied and
        rebuilt freely. A field the preset leaves alone keeps its value.
        """
        if not self.preset:
            return
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in PRESETS[self.preset].items():
            current = getattr(self, name)
            if current == defaults[name]:
                setattr(self, name, value)
            elif current != value:
                self.preset_notes.append(f"preset {self.preset!r} sets {name}={value!r}; the explicit "
                                         f"{name}={current!r} wins")

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = _field_type(f)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(
                    f"parameter {f.name!r} must be {want.__name__}, got {type(value).__name__} {value!r}"
                )
            meta = f.metadata
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ConfigError(f"parameter {f.name!r} must be one of {meta['choices']}, got {value!r}")
            low, high = meta["low"], meta["high"]
            if (low is not None and not value >= low) or (high is not None and not value <= high):
                raise ConfigError(f"parameter {f.name!r} must be in [{_num(low)}, {_num(high)}], got {value!r}")
        if not self.val_fraction + self.test_fraction < 1:
            raise ConfigError("val_fraction + test_fraction must be in [0, 1)")
        if self.fold >= self.folds:
            raise ConfigError(f"parameter 'fold' must be below folds ({self.folds}), got {self.fold}")
        if self.feature == "linear" and self.n_fft // 2 + 1 != MODEL_INPUT:
            raise ConfigError(f"parameter 'n_fft' must be 510 or 511 for feature='linear' (the model takes "
                              f"{MODEL_INPUT} frequency bins, n_fft//2+1), got {self.n_fft}; or use feature='mel'")
        if self.feature == "mel" and self.n_fft // 2 + 1 < MODEL_INPUT:
            raise ConfigError(f"parameter 'n_fft' must be at least 510 for feature='mel' ({MODEL_INPUT} bands need "
                              f"as many STFT bins), got {self.n_fft}")
        if self.hop_length > self.n_fft:
            raise ConfigError(f"parameter 'hop_length' must be at most n_fft ({self.n_fft}), got {self.hop_length}")
        if self.early_stop:
            split, sep, metric = self.early_stop.partition(":")
            if not sep or split not in ("seen_val", "unseen_val", "train") or metric not in ("acc", "loss"):
                raise ConfigError(f"parameter 'early_stop' must be SPLIT:METRIC with SPLIT one of seen_val, "
                                  f"unseen_val, train and METRIC acc or loss, got {self.early_stop!r}")
        self.head_weight_map()  # parse errors surface now, not mid-run
        unknown = [h for h in _names(self.pooled_heads) if self.labels and h not in self.head_names()]
        if unknown:
            raise ConfigError(f"parameter 'pooled_heads' names {unknown}, which are not heads of labels "
                              f"{self.head_names()}")

    # --- derived values -----------------------------------------------------------------------
    def head_names(self) -> list[str]:
        return _names(self.labels)

    def speaker_label_names(self) -> list[str]:
        return _names(self.speaker_labels)

    def head_weight_map(self) -> dict[str, float]:
        weights: dict[str, float] = {}
        for item in _names(self.head_weights):
            name, sep, value = item.partition("=")
            try:
                weights[name.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise ConfigError(f"head_weights item {item!r} is not name=number")
        return weights

    def demo_accent_list(self) -> list[str]:
        return _names(self.demo_accents)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def values(self, role: str) -> dict[str, Any]:
        """The fields of one role (``features``, ``learning``, ``run``) and their values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["role"] == role}

    def remedies(self) -> dict[str, Any]:
        """The generalisation settings (the remedies for a birthplace head that learns voices) that differ
        from their defaults, i.e. from the seed discriminator."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata["group"] == "generalisation" and getattr(self, f.name) != f.default}

    def changed(self) -> dict[str, Any]:
        """Fields whose value differs from the default (after the preset)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def replace(self, **changes: Any) -> "Config":
        return Config.from_dict({**self.to_dict(), **changes})

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Build from plain values (papermill, JSON); an unknown name is an error, not a no-op."""
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            raise ConfigError(f"unknown parameter(s) {unknown}{_suggest(unknown)}")
        return cls(**values)

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
        """A run's recorded settings (config.json holds more keys: the record; those are skipped)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read settings from {path}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of settings")
        known = set(field_names())
        return cls.from_dict({k: v for k, v in data.items() if k in known})


def field_names() -> list[str]:
    return [f.name for f in fields(Config)]


def field_info() -> list[dataclasses.Field]:
    """Every field with its metadata (help, group, role, choices, low, high), in declaration order."""
    return list(fields(Config))


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _num(x: float | None) -> str:
    return "-inf" if x is None else f"{x:g}"


def _suggest(unknown: list[str]) -> str:
    hints = [f"{u!r} -> did you mean {m[0]!r}?" for u in unknown
             if (m := difflib.get_close_matches(u, field_names(), n=1))]
    return f" ({'; '.join(hints)})" if hints else "; see --help for the known ones"


def _field_type(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]
