"""Look at a corpus before training on it: what notebook 01 shows.

The questions are the ones that decide whether the birthplace head can work at all: how many
speakers each birthplace has (the head sees speakers, not utterances, as its real samples), how much
audio each speaker, birthplace and sex contributes, and whether the spectrograms differ visibly.
Every function takes a ``Manifest`` (or its table) and copes with corpora without a birthplace
column (JVS) and with clips cut from long recordings by ``start``/``end`` (CSJ, SAA).
"""
from __future__ import annotations

import sys

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import soundfile as sf
import torch
from IPython.display import Audio

from voxlib.config import Config
from voxlib.corpora.manifest import load_audio, read_manifest
from voxlib.features import spectrogram
from voxlib.notebook import escape_markdown
from voxlib.text import plot_label

NO_LABEL = "(none)"  # shown for an empty label, so an unlabelled group is counted, not dropped
GROUPS = ("speaker", "birthplace", "sex")


def load(cfg: Config):
    """The manifest as training will read it (same bad-file policy)."""
    # the same reading as data.load_run_data; a bar only on a terminal (in a notebook it is stderr lines)
    return read_manifest(cfg.manifest, on_bad_file=cfg.on_bad_file, allow_outside_paths=cfg.allow_outside_paths,
                         sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, cache_dir=cfg.cache_dir or None,
                         progress=sys.stderr.isatty(), speaker_labels=cfg.speaker_label_names(),
                         label_conflicts=cfg.label_conflicts)


def has_labels(table: pd.DataFrame, column: str) -> bool:
    """True when at least one utterance carries a value in ``column``."""
    return column in table.columns and bool(labels(table, column).ne(NO_LABEL).any())


def labels(table: pd.DataFrame, column: str) -> pd.Series:
    """``column`` as str with empty values shown as ``(none)``."""
    if column not in table.columns:
        return pd.Series(NO_LABEL, index=table.index, name=column)
    values = table[column].fillna("").astype(str).str.strip()
    return values.where(values != "", NO_LABEL).rename(column)


def durations(table: pd.DataFrame) -> pd.Series:
    """Seconds of audio per utterance: the manifest's ``duration`` column, else read from the files.

    ``start``/``end`` cut a segment out of a longer recording; an open end runs to the file's end.
    """
    if "duration" in table.columns:
        return pd.to_numeric(table["duration"], errors="raise").astype(float).rename("duration")
    seconds = []
    for path, start, end in zip(table["path"], _column(table, "start"), _column(table, "end")):
        info = sf.info(path)
        stop = end if end == end else info.frames / info.samplerate  # NaN != NaN: open end
        seconds.append(stop - (start if start == start else 0.0))
    return pd.Series(seconds, index=table.index, name="duration", dtype=float)


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    if name in table.columns:
        return pd.to_numeric(table[name], errors="coerce")
    return pd.Series(np.nan, index=table.index)


def validation_report(manifest) -> dict[str, object]:
    """What reading the manifest noticed and which rows it set aside (never silently dropped)."""
    rejected = getattr(manifest, "rejected", None)
    if rejected is None:
        rejected = pd.DataFrame(columns=["row", "path", "reason"])
    return {
        "utterances": len(manifest.table),
        "rejected": len(rejected),
        "notices": list(getattr(manifest, "notices", []) or []),
        "rejected_rows": rejected,
    }


def summary(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per value of ``by``: utterances, speakers, minutes of audio, mean utterance length.

    Largest group first; ties by name, so the order is reproducible.
    """
    frame = pd.DataFrame({by: labels(table, by), "speaker": labels(table, "speaker"),
                          "seconds": durations(table).to_numpy()})
    out = frame.groupby(by).agg(utterances=("seconds", "size"), speakers=("speaker", "nunique"),
                                minutes=("seconds", "sum"), mean_seconds=("seconds", "mean"))
    out["minutes"] = out["minutes"] / 60
    if by == "speaker":
        out = out.drop(columns="speakers")
    out = out.reset_index().sort_values(["utterances", by], ascending=[False, True])
    return out.set_index(by)


def speakers_per_birthplace(table: pd.DataFrame) -> pd.DataFrame:
    """Speakers per birthplace, split by sex: the class balance the birthplace head will face."""
    speakers = pd.DataFrame({"birthplace": labels(table, "birthplace"), "sex": labels(table, "sex"),
                             "speaker": labels(table, "speaker")}).drop_duplicates("speaker")
    counts = pd.crosstab(speakers["birthplace"], speakers["sex"])
    counts["speakers"] = counts.sum(axis=1)
    counts = counts.reset_index().sort_values(["speakers", "birthplace"], ascending=[False, True])
    return counts.set_index("birthplace").rename_axis(columns=None)


def totals(table: pd.DataFrame) -> dict[str, float]:
    """Corpus size in one line: utterances, speakers, birthplaces, hours."""
    return {
        "utterances": len(table),
        "speakers": labels(table, "speaker").nunique(),
        "birthplaces": labels(table, "birthplace").nunique() if has_labels(table, "birthplace") else 0,
        "hours": float(durations(table).sum() / 3600),
    }


# --- figures ---------------------------------------------------------------------------------------
def duration_histogram(table: pd.DataFrame, cfg: Config, ax=None):
    """Utterance lengths against the crop length the network sees (clips shorter are padded)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3))
    data = pd.DataFrame({"seconds": durations(table).to_numpy(), "sex": labels(table, "sex").to_numpy()})
    sns.histplot(data=data, x="seconds", hue="sex" if has_labels(table, "sex") else None, bins=30,
                 multiple="stack", ax=ax)
    crop = cfg.n_frames * cfg.hop_length / cfg.sample_rate
    ax.axvline(crop, color="k", linestyle="--", linewidth=1)
    ax.annotate(f" crop {crop:.2f} s", (crop, ax.get_ylim()[1] * 0.9))
    ax.set(xlabel="utterance length (s)", ylabel="utterances", title="Utterance lengths")
    return ax.figure


def speaker_balance_figure(table: pd.DataFrame, max_classes: int = 60):
    """Bar chart of speakers per birthplace (largest first); big corpora show the largest classes."""
    counts = speakers_per_birthplace(table)
    shown = counts.head(max_classes)
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.22 * len(shown) + 1)))
    sexes = [c for c in shown.columns if c != "speakers"]
    left = np.zeros(len(shown))
    for sex in sexes:
        ax.barh([plot_label(b) for b in shown.index], shown[sex], left=left, label=plot_label(sex))
        left += shown[sex].to_numpy()
    ax.invert_yaxis()
    title = "Speakers per birthplace"
    if len(counts) > len(shown):
        title += f" (largest {len(shown)} of {len(counts)})"
    ax.set(xlabel="speakers", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside the bars
    fig.tight_layout()
    return fig


def example_groups(table: pd.DataFrame, max_groups: int) -> list[tuple[str, str]]:
    """(birthplace, sex) pairs to show, every birthplace before any birthplace's second sex.

    With more birthplaces than panels, each shown birthplace still appears, and the sexes alternate
    from one birthplace to the next instead of all panels showing the same sex.
    """
    sexes: dict[str, list[str]] = {}
    for birthplace, sex in sorted(set(zip(labels(table, "birthplace"), labels(table, "sex")))):
        sexes.setdefault(birthplace, []).append(sex)
    ordered = []
    for rank in range(max(map(len, sexes.values()), default=0)):
        for i, (birthplace, options) in enumerate(sexes.items()):
            if rank < len(options):
                ordered.append((birthplace, options[(rank + i) % len(options)]))
    return ordered[:max_groups]


def example_rows(table: pd.DataFrame, per_group: int = 1, max_groups: int = 8, seed: int = 0) -> pd.DataFrame:
    """A reproducible sample: ``per_group`` utterances per (birthplace, sex), at most ``max_groups`` groups."""
    keys = pd.DataFrame({"birthplace": labels(table, "birthplace"), "sex": labels(table, "sex")})
    groups = example_groups(table, max_groups)
    rng = np.random.default_rng(seed)
    picks = []
    for birthplace, sex in groups:
        index = table.index[(keys["birthplace"] == birthplace) & (keys["sex"] == sex)]
        picks.extend(rng.choice(index, size=min(per_group, len(index)), replace=False).tolist())
    return table.loc[picks]


def load_wave(row: pd.Series, cfg: Config) -> np.ndarray:
    """One utterance as mono float32 at ``cfg.sample_rate`` (segment only, if start/end given)."""
    start = row.get("start", np.nan)
    end = row.get("end", np.nan)
    return load_audio(row["path"], cfg.sample_rate,
                      None if pd.isna(start) else float(start), None if pd.isna(end) else float(end))


def spectrogram_grid(table: pd.DataFrame, cfg: Config, per_group: int = 1, max_groups: int = 8, seed: int = 0):
    """The network's input for example clips: one panel per utterance, labelled birthplace / sex.

    Each panel is the first crop (``n_frames`` frames) of the clip, the same 1x256xT image the
    discriminator is trained on. The features map [-top_db, 0] dB re full scale linearly to [0, 1];
    the colour bar shows that scale in dB.
    """
    rows = example_rows(table, per_group, max_groups, seed)
    cols = min(4, max(1, len(rows)))
    nrows = int(np.ceil(len(rows) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols + 0.8, 2.8 * nrows), squeeze=False,
                             layout="constrained")
    nyquist_khz = cfg.sample_rate / 2000
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    names = pd.DataFrame({c: labels(rows, c) for c in GROUPS})
    for ax, (index, row) in zip(axes.flat, rows.iterrows()):
        image = spectrogram(torch.from_numpy(load_wave(row, cfg)), cfg)[0, :, : cfg.n_frames].numpy()
        seconds = image.shape[1] * cfg.hop_length / cfg.sample_rate
        shown = ax.imshow((image - 1.0) * cfg.top_db, origin="lower", aspect="auto", vmin=-cfg.top_db, vmax=0,
                          cmap="magma", extent=(0, seconds, 0, nyquist_khz))
        # each line made literal on its own (plot_label would print a line break inside a label as backslash-n)
        ax.set_title(plot_label(f"{names.at[index, 'birthplace']} / {names.at[index, 'sex']}") + "\n"
                     + plot_label(names.at[index, "speaker"]), fontsize=9)
        ax.set(xlabel="s", ylabel="kHz")
    if len(rows):
        fig.colorbar(shown, ax=axes, label="dB re full scale", shrink=0.9 if nrows > 1 else 1.0, pad=0.01)
    return fig


def audio_examples(table: pd.DataFrame, cfg: Config, n: int = 4, max_seconds: float = 3.0, seed: int = 0):
    """``(caption, IPython Audio)`` for ``n`` example clips, each cut to ``max_seconds``.

    The caption is Markdown with the labels escaped (corpus labels are untrusted text).
    """
    rows = example_rows(table, per_group=1, max_groups=n, seed=seed)
    names = pd.DataFrame({c: labels(rows, c) for c in GROUPS})
    out = []
    for index, row in rows.iterrows():
        wave = load_wave(row, cfg)[: int(max_seconds * cfg.sample_rate)]
        caption = " / ".join(escape_markdown(names.at[index, c]) for c in GROUPS)
        source = escape_markdown(row.get("rel_path", row["path"]))
        out.append((f"**{caption}** ({source})", Audio(wave, rate=cfg.sample_rate, normalize=True)))
    return out
