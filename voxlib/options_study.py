"""What each training option changes against the default, measured on a small demo corpus.

    python -m voxlib.options_study [--outputs DIR] [--epochs 8] [--width 0.125] [--speakers-per-accent 3]

Trains one run per option (all else default, the same corpus, seed and epochs), one run with another
seed (the noise to read the differences against), and replays the default run from its
``config.json`` through the training CLI's ``--config``. Prints a markdown table: test accuracy per
head on seen and unseen speakers, the best epoch, the epochs trained and the wall time.
docs/training-options.md quotes its output.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from voxlib import runfolder
from voxlib.cli import log_to, parse_config, run_command
from voxlib.config import Config, outputs_dir
from voxlib.evaluate import accuracy_table
from voxlib.text import markdown_table, percent
from voxlib.train import train

# name -> the settings that differ from the default run
OPTIONS = {
    "default (constant lr)": {},
    "seed 1 (noise reference)": {"seed": 1},
    "lr_schedule=cosine": {"lr_schedule": "cosine"},
    "lr_schedule=onecycle": {"lr_schedule": "onecycle"},
    "lr_schedule=plateau, warmup_epochs=2": {"lr_schedule": "plateau", "warmup_epochs": 2},
    "SpecAugment: 2 freq + 2 time masks": {"freq_masks": 2, "time_masks": 2},
    "early_stop=seen_val:acc, patience=2": {"early_stop": "seen_val:acc", "patience": 2},
}
COLUMNS = [("speaker", "seen_test"), ("birthplace", "seen_test"), ("birthplace", "unseen_test"),
           ("sex", "unseen_test")]


def base_config(root: Path, epochs: int, width: float, speakers_per_accent: int, utterances: int) -> Config:
    return Config(width=width, epochs=epochs, demo_speakers_per_accent=speakers_per_accent,
                  demo_utterances=utterances, cache_dir=str(root / "cache"))


def outcome(run_dir: Path) -> dict:
    """The numbers one row of the table shows."""
    table = accuracy_table(runfolder.load_run(run_dir)).set_index(["head", "split"])
    summary = runfolder.read_json(run_dir / runfolder.SUMMARY)
    metrics = pd.read_csv(run_dir / runfolder.METRICS)
    row = {f"{head} {split.replace('_test', '')}": float(table.loc[(head, split), "accuracy"])
           for head, split in COLUMNS if (head, split) in table.index}
    return {**row, "best epoch": summary["best_epoch"], "epochs trained": summary["epochs_trained"],
            "train s": float(metrics.loc[metrics["metric"] == "seconds", "value"].sum())}


def replay_matches(original: Path, replay: Path) -> bool:
    """Every metrics.csv value except wall time identical, and predictions.csv byte for byte."""
    def values(run: Path) -> pd.DataFrame:
        metrics = pd.read_csv(run / runfolder.METRICS)
        return metrics[metrics["metric"] != "seconds"].reset_index(drop=True)

    return (values(original).equals(values(replay))
            and (original / runfolder.PREDICTIONS).read_bytes() == (replay / runfolder.PREDICTIONS).read_bytes())


def run_study(root: Path, epochs: int = 8, width: float = 0.125, speakers_per_accent: int = 3,
              utterances: int = 20) -> tuple[pd.DataFrame, bool]:
    base = base_config(root, epochs, width, speakers_per_accent, utterances)
    rows, runs = [], {}
    for name, changes in OPTIONS.items():
        run_dir = root / "runs" / f"option{len(runs)}"
        runs[name] = train(base.replace(run_dir=str(run_dir), **changes))
        rows.append({"option": name, **outcome(runs[name])})
    original = runs["default (constant lr)"]
    replay = train(parse_config(["--config", str(original / runfolder.CONFIG), "--run-dir", str(root / "runs" / "replay")]))
    rows.append({"option": "replay of the default via --config", **outcome(replay)})
    return pd.DataFrame(rows), replay_matches(original, replay)


def markdown(table: pd.DataFrame) -> str:
    shares = [c for c in table.columns if c.startswith(("speaker", "birthplace", "sex"))]
    text = table.copy()
    for column in shares:
        text[column] = [percent(v) for v in table[column]]
    text["train s"] = [f"{v:.0f}" for v in table["train s"]]
    return markdown_table(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voxlib.options_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--outputs", metavar="DIR", default=None, help="root of everything vox writes (as for every "
                        "command); the study's runs and cache go to DIR/options_study")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--speakers-per-accent", type=int, default=3)
    parser.add_argument("--utterances", type=int, default=20)
    args = parser.parse_args(argv)
    log_to(sys.stderr, level=30)
    if args.outputs:  # the demo corpus goes there too
        os.environ["VOX_OUTPUTS"] = str(Path(args.outputs).expanduser().resolve())
    root = outputs_dir() / "options_study"
    root.mkdir(parents=True, exist_ok=True)
    table, same = run_study(root, args.epochs, args.width, args.speakers_per_accent, args.utterances)
    print(markdown(table))
    print(f"replay via --config: metrics and predictions {'identical' if same else 'DIFFER'} to the original")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
