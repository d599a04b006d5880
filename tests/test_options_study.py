"""The options study's bookkeeping, on synthetic run folders (the study itself trains for minutes)."""
import json
import shutil

import pandas as pd

from run_folder_factory import make_run_folder
from voxlib import options_study


def test_outcome_reads_test_accuracies_and_the_training_record(tmp_path):
    run = make_run_folder(tmp_path / "run", birthplace_seen=0.75, birthplace_unseen=0.4, epochs=4)
    (run / "summary.json").write_text(json.dumps({"best_epoch": 3, "epochs_trained": 4}))
    row = options_study.outcome(run)
    assert row["birthplace seen"] == 0.75 and row["birthplace unseen"] == 0.4
    assert row["best epoch"] == 3 and row["epochs trained"] == 4 and row["train s"] == 4 * 1.5


def test_replay_check_ignores_wall_time_but_no_other_difference(tmp_path):
    run = make_run_folder(tmp_path / "run")
    replay = tmp_path / "replay"
    shutil.copytree(run, replay)
    metrics = pd.read_csv(replay / "metrics.csv")
    metrics.loc[metrics["metric"] == "seconds", "value"] += 1.0
    metrics.to_csv(replay / "metrics.csv", index=False)
    assert options_study.replay_matches(run, replay)
    metrics.loc[metrics["metric"] == "loss", "value"] += 1e-9
    metrics.to_csv(replay / "metrics.csv", index=False)
    assert not options_study.replay_matches(run, replay)


def test_markdown_table_shows_shares_as_percent():
    table = pd.DataFrame([{"option": "default", "sex seen": 0.5, "best epoch": 2, "epochs trained": 8, "train s": 12.4}])
    lines = options_study.markdown(table).splitlines()
    assert lines[0] == "| option | sex seen | best epoch | epochs trained | train s |"
    assert lines[2] == "| default | 50.0% | 2 | 8 | 12 |"
