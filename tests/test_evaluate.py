"""evaluate.py and plots.py on synthetic run folders whose numbers are known by construction."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from run_folder_factory import make_run_folder  # noqa: E402

from voxlib import analysis, plots, verdict  # noqa: E402
from voxlib.evaluate import (
    accuracy_table,
    class_sizes,
    confusion,
    learning_curves,
    per_class_metrics,
    scored,
    top_k_accuracy,
)
from voxlib.runfolder import HELD_OUT_SPLITS, RunError, load_run


def _edit_predictions(run_dir, mask_fn, column, value):
    path = run_dir / "predictions.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[mask_fn(frame), column] = value
    frame.to_csv(path, index=False)


# --- loading ---------------------------------------------------------------------------------------
def test_load_run_reads_every_file_and_embeddings_lazily(tmp_path):
    run = load_run(make_run_folder(tmp_path / "run", speakers=(4, 4, 4), epochs=5))
    assert run.heads == ["speaker", "birthplace", "sex"]
    assert len(run.splits) == 15 * 10 and set(run.splits["split"]) == {"train", *HELD_OUT_SPLITS}
    assert len(run.predictions) == 12 * 4 + 3 * 10  # 4 held-out utterances per seen speaker, all unseen
    assert run.metrics["epoch"].max() == 5 and run.config["epochs"] == 5
    assert "embeddings" not in run.__dict__  # not read until asked for
    emb = run.embeddings
    assert emb.features.dtype == np.float32 and emb.features.shape == (12 * 4 + 12 * 2 + 3 * 5, 16)
    assert set(emb.split) == {"train", "seen_test", "unseen_test"}


@pytest.mark.parametrize("name", ["config.json", "labels.json", "splits.csv", "metrics.csv", "predictions.csv"])
def test_missing_file_is_named(tmp_path, name):
    run_dir = make_run_folder(tmp_path / "run")
    (run_dir / name).unlink()
    with pytest.raises(RunError, match=name):
        load_run(run_dir)


def test_missing_embeddings_named_on_first_use(tmp_path):
    run = load_run(make_run_folder(tmp_path / "run", write_embeddings=False))
    assert not run.has_embeddings
    with pytest.raises(RunError, match="embeddings.npz"):
        run.embeddings


def test_bad_prediction_names_file_line_and_value(tmp_path):
    run_dir = make_run_folder(tmp_path / "run")
    _edit_predictions(run_dir, lambda f: f.index == 6, "birthplace_pred", "atlantis")
    with pytest.raises(RunError, match=r"predictions.csv: line 8: birthplace_pred 'atlantis'"):
        load_run(run_dir)


def test_missing_column_and_bad_number_are_named(tmp_path):
    run_dir = make_run_folder(tmp_path / "run")
    frame = pd.read_csv(run_dir / "predictions.csv", dtype=str, keep_default_na=False)
    frame.drop(columns="sex_top5").to_csv(run_dir / "predictions.csv", index=False)
    with pytest.raises(RunError, match=r"predictions.csv: missing column\(s\) \['sex_top5'\]"):
        load_run(run_dir)
    frame.loc[3, "sex_prob"] = "high"
    frame.to_csv(run_dir / "predictions.csv", index=False)
    with pytest.raises(RunError, match=r"line 5: sex_prob 'high'"):
        load_run(run_dir)


def test_embedding_split_disagreeing_with_splits_csv_is_an_error(tmp_path):
    run_dir = make_run_folder(tmp_path / "run")
    with np.load(run_dir / "embeddings.npz") as data:
        arrays = dict(data)
    arrays["split"] = arrays["split"].astype("<U16")
    arrays["split"][-1] = "train"  # an unseen_test row relabelled as training data
    np.savez(run_dir / "embeddings.npz", **arrays)
    with pytest.raises(RunError, match=r"row \d+ is marked 'train' but splits.csv puts it in 'unseen_test'"):
        load_run(run_dir).embeddings


# --- accuracies and baselines ----------------------------------------------------------------------
def test_accuracy_majority_and_chance_exact(tmp_path):
    # train majority is place00 (6 speakers); the unseen splits are dominated by place01 instead,
    # so a majority class chosen on the scored split would give 3/5, the honest one 1/5.
    run = load_run(make_run_folder(tmp_path / "run", speakers=(6, 3, 2), unseen=(1, 3, 1),
                                   birthplace_seen=0.75, birthplace_unseen=0.4))
    table = accuracy_table(run).set_index(["head", "split"])
    unseen = table.loc[("birthplace", "unseen_val")]
    assert unseen["n"] == 25 and unseen["accuracy"] == pytest.approx(10 / 25)
    assert unseen["majority_class"] == "place00" and unseen["majority"] == pytest.approx(5 / 25)
    assert unseen["chance"] == pytest.approx(1 / 3) and unseen["unscored"] == 0
    seen = table.loc[("birthplace", "seen_test")]
    assert seen["n"] == 22 and seen["accuracy"] == pytest.approx(round(0.75 * 22) / 22)
    assert seen["majority"] == pytest.approx(12 / 22)
    assert table.loc[("speaker", "seen_val"), "chance"] == pytest.approx(1 / 11)
    # the speaker head has no target on unseen speakers: no row rather than a zero
    assert ("speaker", "unseen_val") not in table.index


def test_top_k_from_top5_column(tmp_path):
    run = load_run(make_run_folder(tmp_path / "run", speakers=(2,) * 6, unseen=1, birthplace_seen=0.5,
                                   birthplace_unseen=0.5, true_in_top3=0.5))
    rows = scored(run, "birthplace", HELD_OUT_SPLITS)
    n = len(rows)
    right = int((rows["birthplace_true"] == rows["birthplace_pred"]).sum())
    assert right == 2 * round(0.5 * 24) + 2 * round(0.5 * 30)
    assert top_k_accuracy(rows, "birthplace", 1) == pytest.approx(right / n)
    assert top_k_accuracy(rows, "birthplace", 3) == pytest.approx((right + round(0.5 * (n - right))) / n)
    # with 6 classes the factory keeps the true class out of an unhinted wrong row's top five
    assert top_k_accuracy(rows, "birthplace", 5) == top_k_accuracy(rows, "birthplace", 3)
    with pytest.raises(ValueError):
        top_k_accuracy(rows, "birthplace", 6)


def test_balanced_accuracy_and_per_class_by_hand(tmp_path):
    run_dir = make_run_folder(tmp_path / "run", speakers=(6, 3, 2), unseen=(2, 1, 1))
    _edit_predictions(run_dir, lambda f: f["split"].str.startswith("unseen"), "birthplace_pred", "place00")
    run = load_run(run_dir)
    table = accuracy_table(run).set_index(["head", "split"])
    for split in ("unseen_val", "unseen_test"):
        assert table.loc[("birthplace", split), "accuracy"] == pytest.approx(0.5)  # 10 of 20 are place00
        assert table.loc[("birthplace", split), "balanced_accuracy"] == pytest.approx(1 / 3)
    pcm = per_class_metrics(run, "birthplace").set_index("class")
    assert list(pcm.index) == ["place00", "place01", "place02"]
    assert pcm["support"].tolist() == [20, 10, 10]
    assert pcm["train_speakers"].tolist() == [6, 3, 2] and pcm["train_utterances"].tolist() == [36, 18, 12]
    assert pcm["recall"].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert pcm.loc["place00", "precision"] == pytest.approx(0.5)
    assert pcm.loc["place00", "f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_confusion_rows_normalised_and_sorted_by_class_size(tmp_path):
    run_dir = make_run_folder(tmp_path / "run", speakers=(2, 6, 3), unseen=1, birthplace_unseen=0.6)
    run = load_run(run_dir)
    assert class_sizes(run, "birthplace").index.tolist() == ["place01", "place02", "place00"]
    matrix = confusion(run, "birthplace", "unseen_test")
    assert matrix.index.tolist() == matrix.columns.tolist() == ["place01", "place02", "place00"]
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    rows = scored(run, "birthplace", "unseen_test")
    counts = pd.crosstab(rows["birthplace_true"], rows["birthplace_pred"])
    for true in matrix.index:  # every cell equals its count over the true class's row count
        for pred in matrix.columns:
            expected = counts.loc[true].get(pred, 0) / (rows["birthplace_true"] == true).sum()
            assert matrix.loc[true, pred] == pytest.approx(expected)
    assert np.trace(matrix.to_numpy()) / 3 == pytest.approx(0.6)  # equal class sizes: mean recall = accuracy
    raw = confusion(run, "birthplace", "unseen_test", normalize=None)
    assert raw.to_numpy().sum() == len(rows)


def test_learning_curves_long_format_in_head_order(tmp_path):
    run = load_run(make_run_folder(tmp_path / "run", epochs=6))
    loss = learning_curves(run)
    assert list(loss.columns) == ["epoch", "split", "head", "value"]
    assert list(dict.fromkeys(loss["head"])) == run.heads
    assert len(loss) == 6 * 3 * 3
    train = loss[(loss["split"] == "train") & (loss["head"] == "birthplace")]["value"].to_numpy()
    assert (np.diff(train) < 0).all()
    assert len(learning_curves(run, "acc", splits=("train",))) == 6 * 3
    with pytest.raises(RunError, match="no 'perplexity' values"):
        learning_curves(run, "perplexity")


def test_unknown_head_is_named(tmp_path):
    run = load_run(make_run_folder(tmp_path / "run", heads=("speaker", "sex")))
    with pytest.raises(RunError, match="no head 'birthplace'"):
        accuracy_table(run, heads=["birthplace"])


# --- plots ------------------------------------------------------------------------------------------
def test_plots_return_closed_figures_with_expected_axes(tmp_path):
    run = load_run(make_run_folder(tmp_path / "a", probe_signal=3.0, regions=("n", "n", "s")))
    other = load_run(make_run_folder(tmp_path / "b"))
    sized = load_run(make_run_folder(tmp_path / "c", speakers=(5, 3, 2)))  # classes of different sizes
    before = plt.get_fignums()
    report = verdict.birthplace_report(run)
    figures = {
        "loss": (plots.learning_curves(learning_curves(run)), 3),
        "acc": (plots.learning_curves(learning_curves(run, "acc"), "accuracy"), 3),
        "confusion": (plots.confusion_heatmap(report["confusion_unseen"]), 2),  # heatmap + colour bar
        "recall": (plots.recall_vs_size(analysis.class_size_table(sized)), 1),
        "embedding": (plots.embedding_scatter(report["projection"]), 2),
        "seen_unseen": (plots.seen_unseen_bars(report["seen_unseen"]), 1),
        "compare": (plots.compare_runs(verdict.compare_runs(run, other)), 1),
        "gradient": (plots.gradient_share(report["gradient_share"]), 1),
    }
    for name, (fig, n_axes) in figures.items():
        assert isinstance(fig, Figure), name
        assert len(fig.axes) == n_axes, name
        fig.savefig(tmp_path / f"{name}.png", dpi=40)  # renders although already closed
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert plt.get_fignums() == before
    assert figures["recall"][0].axes[0].get_xscale() == "log"


def test_a_plot_that_would_show_nothing_is_a_sentence(tmp_path):
    """Classes of one size make recall-vs-size a single vertical column of dots, and one epoch makes the
    gradient share a stack of zero width: each becomes one sentence, shown as Markdown."""
    run = load_run(make_run_folder(tmp_path / "a", epochs=1))  # 4 training speakers in every class
    report = verdict.birthplace_report(run)
    recall = plots.recall_vs_size(report["class_sizes"])
    assert isinstance(recall, plots.Sentence) and recall.startswith("Every class has 4 training speakers, so recall")
    assert "Every class has 4 training speakers" in recall._repr_markdown_()
    share = plots.gradient_share(report["gradient_share"])
    assert isinstance(share, plots.Sentence) and share.startswith("One epoch only")
    assert all(f"{head} " in share for head in run.heads) and share.count("%") == len(run.heads)


def test_accuracy_curves_draw_chance_and_majority_once_each_or_merged(tmp_path):
    run = load_run(make_run_folder(tmp_path / "a"))
    table = accuracy_table(run)

    def baseline_labels(baselines):
        fig = plots.learning_curves(learning_curves(run, "acc"), "accuracy", baselines=baselines)
        return [sorted(line.get_label() for line in ax.get_lines() if line.get_label().startswith(("chance", "majority")))
                for ax in fig.axes]

    apart = table.assign(majority=table["chance"] + 0.2)
    assert all(labels == ["chance", "majority (seen_val)"] for labels in baseline_labels(apart))
    equal = table.assign(majority=table["chance"])  # balanced classes: two lines would hide each other
    assert all(labels == ["chance = majority (seen_val)"] for labels in baseline_labels(equal))


def test_epoch_axes_tick_whole_epochs_only(tmp_path):
    run = load_run(make_run_folder(tmp_path / "a", epochs=2))  # matplotlib alone would tick 1.0, 1.2, ...
    fig = plots.learning_curves(learning_curves(run, "acc"), "accuracy")
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t <= fig.axes[0].get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_tables_show_shares_as_percent_without_row_numbers():
    from voxlib.notebook import as_table

    html = plots.styled(pd.DataFrame({"head": ["sex"], "accuracy": [0.5], "low": [0.25]})).to_html()
    assert ">50.0%<" in html and ">25.0%<" in html and ">0<" not in html  # no 0..n-1 index column
    named = plots.styled(pd.DataFrame({"accuracy": [0.5]}, index=["sex"])).to_html()
    assert ">sex<" in named  # a meaningful index stays
    table = as_table({"head": "birthplace", "probe_accuracy": 0.1875, "slope": -0.02292311, "n_test": 80,
                      "relative_change": -0.213})
    assert table["value"].tolist() == ["birthplace", "18.8%", "-0.023", "80", "-21.3%"]


def test_tables_use_one_number_format_and_leave_out_empty_columns():
    """Counts as integers (never 1.92e+03), shares as percent with one decimal (never 0.992188), other
    numbers in fixed notation; a column with no value at all (a spread over seeds of one seed) is left out."""
    frame = pd.DataFrame({"head": ["birthplace", "sex"], "unseen": [0.992188, 0.5], "unseen_n": [1920.0, np.nan],
                          "seen_std_over_seeds": [np.nan, np.nan], "level_dbfs_median": [-42.3456, 7812.5],
                          "slope": [-0.02292, 0.00012]})
    html = plots.styled(frame, caption="fold0 only").to_html()
    assert ">99.2%<" in html and ">50.0%<" in html and ">1,920<" in html
    assert ">-42.3<" in html and ">7,812<" in html and ">-0.023<" in html and ">0.00012<" in html
    assert "e+" not in html and "0.992188" not in html and "seen_std_over_seeds" not in html
    assert ">fold0 only</caption>" in html


def test_confusion_heatmap_scales_with_many_classes():
    small = pd.DataFrame(np.eye(3), index=list("abc"), columns=list("abc"))
    names = [f"class{i:02d}" for i in range(60)]
    large = pd.DataFrame(np.eye(60), index=names, columns=names)
    fig_small, fig_large = plots.confusion_heatmap(small), plots.confusion_heatmap(large)
    assert len(fig_small.axes[0].texts) == 9  # every cell annotated
    assert len(fig_large.axes[0].texts) == 0  # too many to print
    assert fig_large.get_size_inches()[0] > 2 * fig_small.get_size_inches()[0]
    ticks = fig_large.axes[0].get_xticklabels()
    assert len(ticks) == 60 and ticks[0].get_fontsize() < fig_small.axes[0].get_xticklabels()[0].get_fontsize()


def test_labels_file_must_map_heads_to_classes(tmp_path):
    run_dir = make_run_folder(tmp_path / "run")
    (run_dir / "labels.json").write_text(json.dumps({"sex": "female"}))
    with pytest.raises(RunError, match="labels.json"):
        load_run(run_dir)
