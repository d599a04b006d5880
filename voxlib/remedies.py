"""What makes birthplace hold on new voices: the seed discriminator, each remedy alone and preset accent,
trained on the same speaker folds and set beside the reference baselines.

Usage::

    python -m voxlib.remedies                                   # the demo corpus, 3 speaker folds
    python -m voxlib.remedies --manifest M.csv --folds 5 --out outputs/remedies/M
    python -m voxlib.remedies --variants seed,accent --epochs 6 # a subset, other training settings

Every variant is the base settings (the flags given; ``preset`` is the variant's own) plus its
changes, trained as a pooled folder of ``folds`` members inside the study folder by the training
command's own runner, so the folds, the splits and the seeds are the same for every variant, and an
interrupted study resumes member by member (finished members are found complete). Then the study
folder gets ``study.csv`` (one row per variant and per reference baseline: seen speaker, seen
birthplace, unseen birthplace with its 95 % interval resampled over speakers, unseen sex, training
minutes), ``study.md`` (the same as a Markdown table), ``study.png`` (unseen birthplace per variant
against the baselines) and ``study.json`` (written last: the settings and the table). docs/remedies.md
quotes one run on the demo corpus.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from voxlib import runfolder
from voxlib.baselines import pooled_reference_baselines
from voxlib.cli import log_to, make_parser, parse, run_command
from voxlib.config import ACCENT_PRESET, Config, ConfigError, outputs_dir
from voxlib.corpora.source import corpus_name
from voxlib.experiment import run_experiment
from voxlib.plots import variant_intervals
from voxlib.text import markdown_table, percent
from voxlib.train import train_run

log = logging.getLogger("voxlib.train")  # one stream with the trainings it runs

DEFAULT_FOLDS = 3
# One idea each, at the value preset accent uses where the preset has it. The adversary needs a branch to
# act on; alone, voice perturbation drops the speaker and sex targets of the crops it gives a new voice.
PERTURBATION = ("perturb_formant", "perturb_pitch", "perturb_tempo", "perturb_share")
REMEDIES = (
    ("utterance-norm", "per-utterance input normalisation", dict(utterance_norm=True)),
    ("pooled-head", "time-pooled birthplace head", dict(pooled_heads=ACCENT_PRESET["pooled_heads"])),
    ("branch", "birthplace branch (the last 2 blocks)", dict(accent_branch=2)),
    ("adversary", "branch + speaker adversary", dict(accent_branch=2, speaker_adversary=0.3, adversary_warmup=2)),
    ("own-network", "birthplace network of its own", dict(accent_branch=ACCENT_PRESET["accent_branch"])),
    ("envelope", "spectral envelope input (no pitch harmonics)", dict(input_lifter=ACCENT_PRESET["input_lifter"])),
    ("perturbation", "voice perturbation (formants, pitch, tempo)", {k: ACCENT_PRESET[k] for k in PERTURBATION}),
    ("regularisation", "trunk dropout + weight decay", dict(trunk_dropout=0.2, weight_decay=1e-4)),
)


def variants() -> list[tuple[str, str, dict[str, Any]]]:
    """(folder name, label, Config changes) of every variant, the seed discriminator first, preset accent last."""
    return [("seed", "seed discriminator", {}), *REMEDIES, ("accent", "preset accent", {"preset": "accent"})]


def study_configs(base: Config, folds: int, root: Path, chosen: Sequence[str] | None = None) -> list[tuple[str, str, Config]]:
    """The Config of each chosen variant: the base settings without a preset, the variant's changes,
    ``folds`` speaker folds and its pooled folder inside ``root``."""
    known = {name for name, _, _ in variants()}
    unknown = sorted(set(chosen or ()) - known)
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; known: {', '.join(n for n, _, _ in variants())}")
    plain = base.replace(preset="", **{name: Config().to_dict()[name] for name in base.remedies()})
    return [(name, label, plain.replace(**changes, folds=folds, seeds=1, run_dir=str(root / name)))
            for name, label, changes in variants() if chosen is None or name in chosen]


def run_study(base: Config, folds: int = DEFAULT_FOLDS, root: Path | None = None,
              chosen: Sequence[str] | None = None, encoder: bool = True) -> Path:
    """Train (or resume, or find finished) every variant on the same folds, then write the study files."""
    if folds < 2:
        raise ConfigError(f"parameter 'folds': a study pools every variant over speaker folds; give at least 2, got {folds}")
    root = Path(root) if root else outputs_dir() / "remedies" / f"{corpus_name(base)}-folds{folds}"
    plan = study_configs(base, folds, root, chosen)
    with runfolder.writing(root, "study folder"):
        (root / runfolder.STUDY).unlink(missing_ok=True)  # complete again only once written below
        for i, (name, label, cfg) in enumerate(plan, 1):
            log.info("variant %d of %d: %s (%s)", i, len(plan), label, ", ".join(
                f"{k}={v}" for k, v in changes_of(cfg).items()) or "no remedy")
            run_experiment(cfg, train_run)
        table = study_table(plan, encoder)
        runfolder.write_csv(root, runfolder.STUDY_CSV, table)
        runfolder.write_text(root, runfolder.STUDY_MD, study_markdown(table))
        figure = variant_intervals(table)
        runfolder.write_figure(root, runfolder.STUDY_PNG, figure)
        runfolder.write_json(root, runfolder.STUDY, {"folds": folds, "base": base.to_dict(),
                                                "variants": {name: changes_of(cfg) for name, _, cfg in plan},
                                                "table": table.astype(object).where(table.notna(), None)
                                                .to_dict(orient="records")})
    return root


def changes_of(cfg: Config) -> dict[str, Any]:
    """What a variant changes against the seed discriminator: its preset and its remedies (after the preset)."""
    return ({"preset": cfg.preset} if cfg.preset else {}) | cfg.remedies()


def study_table(plan: list[tuple[str, str, Config]], encoder: bool = True) -> pd.DataFrame:
    """One row per variant (pooled over its folds) and one per reference baseline on the same folds."""
    rows = []
    for name, label, cfg in plan:
        pooled = runfolder.load_pooled(cfg.run_dir)
        summary = pooled.summary
        seconds = sum(float(runfolder.load_run(m).metrics.query("metric == 'seconds'")["value"].sum())
                      for m in pooled.members)
        unseen = summary.get("birthplace", {}).get("unseen", {})
        sex = summary.get("sex", {}).get("unseen", {})
        rows.append({"variant": name, "label": label,
                     "changes": ", ".join(f"{k}={v}" for k, v in changes_of(cfg).items()),
                     "seen_speaker": summary.get("speaker", {}).get("seen", {}).get("accuracy"),
                     "seen_birthplace": summary.get("birthplace", {}).get("seen", {}).get("accuracy"),
                     "unseen_birthplace": unseen.get("accuracy"), "unseen_low": unseen.get("low"),
                     "unseen_high": unseen.get("high"), "unseen_speakers": unseen.get("speakers"),
                     "chance": summary.get("birthplace", {}).get("chance"),
                     "unseen_sex": sex.get("accuracy"), "sex_low": sex.get("low"), "sex_high": sex.get("high"),
                     "train_minutes": seconds / 60})
    members = [runfolder.load_run(m) for m in runfolder.load_pooled(plan[0][2].run_dir).members]
    reference = pooled_reference_baselines(members, encoder=encoder).table
    for representation, group in reference.groupby("representation", sort=False):
        score = {(r.head, r.split): r.accuracy for r in group.itertuples()}
        rows.append({"variant": f"baseline:{representation}", "label": BASELINE_LABELS.get(representation, representation),
                     "changes": "", "seen_speaker": score.get(("speaker", "seen")),
                     "seen_birthplace": score.get(("birthplace", "seen")),
                     "unseen_birthplace": score.get(("birthplace", "unseen")), "unseen_sex": score.get(("sex", "unseen"))})
    return pd.DataFrame(rows, columns=list(runfolder.STUDY_COLUMNS)).astype({"unseen_speakers": "Int64"})


BASELINE_LABELS = {"mfcc": "MFCC statistics + logistic regression", "encoder": "speaker encoder + logistic regression"}


def study_markdown(table: pd.DataFrame) -> str:
    """The study table as a person reads it: percent with one decimal, the interval in brackets."""
    def share(value) -> str:
        return "—" if value is None or pd.isna(value) else percent(value)

    shown = pd.DataFrame({
        "variant": table["label"],
        "seen speaker": table["seen_speaker"].map(share),
        "seen birthplace": table["seen_birthplace"].map(share),
        "unseen birthplace [95 % interval]": [
            share(r.unseen_birthplace) + (f" [{share(r.unseen_low)}, {share(r.unseen_high)}]"
                                          if pd.notna(r.unseen_low) else "") for r in table.itertuples()],
        "unseen sex": table["unseen_sex"].map(share),
        "training (min)": table["train_minutes"].map(lambda m: "—" if pd.isna(m) else f"{m:.1f}"),
    })
    return markdown_table(shown) + "\n"


# --- command line --------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    def own(p: argparse.ArgumentParser) -> None:
        p.add_argument("--variants", metavar="LIST", default=None,
                       help="comma list of variants to train (default: all): "
                            + ", ".join(name for name, _, _ in variants()))
        p.add_argument("--out", metavar="DIR", default=None,
                       help="study folder (new, empty or an earlier study's, which is resumed); default: "
                            "outputs/remedies/<corpus>-folds<K>")
        p.add_argument("--no-encoder", action="store_true", help="skip the speaker-encoder baseline")

    return make_parser("python -m voxlib.remedies", __doc__.split("\n\n")[0], extra=own)


def main(argv: list[str] | None = None) -> int:
    log_to(sys.stderr)
    args, cfg = parse(parser(), argv)
    if cfg.preset:
        raise ConfigError("parameter 'preset': the study sets each variant's preset itself; leave it out")
    folds = cfg.folds if args.folds is not None else DEFAULT_FOLDS
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    t0 = time.perf_counter()
    root = run_study(cfg.replace(folds=1), folds, Path(args.out) if args.out else None, chosen,
                     encoder=not args.no_encoder)
    print((root / runfolder.STUDY_MD).read_text(encoding="utf-8"))
    print(f"study folder {root} ({(time.perf_counter() - t0) / 60:.1f} min)", file=sys.stderr)
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
