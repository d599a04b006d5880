"""Class 9: corpus text reaches every output unchanged in meaning and harmless.

One generated corpus whose birthplace labels, speaker names and file names carry HTML, Markdown, TeX
math, CSV control characters (quotes, commas, CR, LF, tab), right-to-left text, emoji and combining
marks is trained on; then every medium is checked: CSV files read back what was written, plots
draw the text literally (no mathtext), Markdown renders to the literal text, HTML escapes it,
TensorBoard tags stay one line, and errors and logs show control characters escaped on one line.
"""
from __future__ import annotations

import csv
import html
import io
import re
import shutil
import unicodedata
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

from voxlib import analysis, evaluate, explore, plots, runfolder
from voxlib.cli import describe_error
from voxlib.config import Config
from voxlib.corpora import ManifestError, read_manifest
from voxlib.notebook import escape_markdown
from voxlib.text import markdown, one_line, plot_label, tag
from voxlib.train import train

matplotlib.use("Agg")

HOSTILE = {  # the tiny corpus' birthplaces -> labels that attack each medium
    "north": '<script>alert("x")</script> <b>bold</b> **md** _it_ [a](http://x) # h',
    "south": r"$\frac{1}{2}^x_y$ costs $x$",  # an even number of $: mathtext would parse (and fail)
    "east": 'comma, "quote"; tab\tcarriage\rreturn\nnewline',
}
UNICODE = "עברית مرحبا 🎙️ cafe\u0301 \u202eRTL"  # RTL scripts, emoji, a combining accent, an override
ALL_LABELS = [*HOSTILE.values()]
FAST = dict(width=1 / 16, batch_size=8, epochs=1, threads=2, eval_crops=1, grad_log_every=1)


def hostile_name(speaker: str, u: int) -> str:
    return f'{speaker} $x$ <i>,"q"\r{UNICODE} {u}.wav'


@pytest.fixture(scope="module")
def corpus(tiny_corpus, tmp_path_factory) -> Path:
    """The tiny corpus with every birthplace, speaker and file name made hostile."""
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    root.mkdir()
    with tiny_corpus.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        speaker = f"{row['speaker']} {UNICODE} <u>$s$</u>"
        u = int(Path(row["path"]).stem.rsplit("_", 1)[1])
        name = hostile_name(row["speaker"], u)
        shutil.copy(tiny_corpus.parent / row["path"], root / name)
        out.append({"path": name, "speaker": speaker, "birthplace": HOSTILE[row["birthplace"].rstrip("0123456789")
                                                                             if row["birthplace"] not in HOSTILE
                                                                             else row["birthplace"]],
                    "sex": row["sex"]})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(out[0]), quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(out)
    return manifest


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> runfolder.Run:
    folder = tmp_path_factory.mktemp("hostile_run") / "run"
    train(Config(**FAST, manifest=str(corpus), cache_dir=str(tmp_path_factory.mktemp("cache")), run_dir=str(folder)))
    return runfolder.load_run(folder)


def test_the_manifest_reads_back_every_label_and_file_name(corpus):
    table = read_manifest(corpus, progress=False, use_cache=False).table
    assert set(table["birthplace"]) == set(ALL_LABELS)
    assert all(Path(p).is_file() for p in table["path"])
    # speaker names are compared in NFC (corpora/labels.py): the combining accent is composed, same text
    assert "\r" in table["rel_path"].iloc[0] and unicodedata.normalize("NFC", UNICODE) in table["speaker"].iloc[0]


def test_every_csv_of_the_run_reads_back_what_was_written(corpus, run):
    source = read_manifest(corpus, progress=False, use_cache=False).table
    assert set(run.predictions["birthplace_true"]) == set(ALL_LABELS)
    assert set(run.predictions["birthplace_pred"]) <= set(ALL_LABELS)
    assert set(run.splits["speaker"]) == set(source["speaker"])
    assert runfolder.read_labels(run.path)["birthplace"] == sorted(ALL_LABELS) or \
        set(runfolder.read_labels(run.path)["birthplace"]) == set(ALL_LABELS)
    # the low-level contract: a frame of hostile cells survives csv_bytes -> read_csv unchanged
    frame = pd.DataFrame({"text": ALL_LABELS + [UNICODE, "NA", ""], "n": ["1", "2", "3", "4", "5", "6"]})
    (run.path.parent / "roundtrip.csv").write_bytes(runfolder.csv_bytes(frame))
    back = runfolder.read_csv(run.path.parent / "roundtrip.csv", ["text"])
    assert list(back["text"]) == list(frame["text"])


def _texts(fig) -> list[matplotlib.text.Text]:
    fig.canvas.draw()  # tick labels exist only once drawn; mathtext errors surface here
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def _drawn_literally(fig, labels) -> None:
    if isinstance(fig, plots.Sentence):  # a plot that would show nothing (one epoch): its sentence names them
        assert all(one_line(label) in fig for label in labels), (labels, fig)
        return
    texts = _texts(fig)
    shown = [t._preprocess_math(t.get_text()) for t in texts]  # what matplotlib draws, and whether as TeX
    assert not any(is_math for _, is_math in shown)
    drawn = [s for s, _ in shown]
    for label in labels:
        assert any(one_line(label) in s for s in drawn), (label, drawn)


def test_plots_draw_every_label_literally(run):
    _drawn_literally(plots.confusion_heatmap(evaluate.confusion(run, "birthplace", runfolder.UNSEEN_SPLITS)),
                     ALL_LABELS)
    _drawn_literally(plots.embedding_scatter(analysis.project_embeddings(run, method="pca")), ALL_LABELS)
    _drawn_literally(plots.learning_curves(evaluate.learning_curves(run, "acc"), "accuracy",
                                           evaluate.accuracy_table(run)), [])
    sizes = analysis.class_size_table(run)  # classes of one size give a sentence, not a figure: vary them
    _drawn_literally(plots.recall_vs_size(sizes.assign(train_speakers=range(1, len(sizes) + 1))), [])
    _drawn_literally(plots.seen_unseen_bars(analysis.seen_unseen(run)), [])
    _drawn_literally(plots.gradient_share(analysis.gradient_share(run)), [])
    table = run.splits.assign(seconds=1.0)
    _drawn_literally(explore.speaker_balance_figure(table), ALL_LABELS)
    for fig in [plots.confusion_heatmap(evaluate.confusion(run, "birthplace"), title=ALL_LABELS[1])]:
        fig.savefig(io.BytesIO(), format="png")


def test_markdown_renders_to_the_literal_text():
    mistune = pytest.importorskip("mistune")
    for label in ALL_LABELS + [UNICODE, "\x1b[31mred\x1b[0m"]:
        assert escape_markdown(label) == markdown(label)
        rendered = mistune.html(markdown(label)).strip()
        assert rendered.startswith("<p>") and rendered.endswith("</p>")
        inner = rendered[3:-4]
        assert "<" not in inner.replace("&lt;", "")  # no element made from the label
        assert html.unescape(inner) == one_line(label)


def test_html_report_parts_escape_every_label(run):
    styled = plots.styled(evaluate.per_class_metrics(run, "birthplace")).to_html()
    cells = [html.unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", styled, re.S)]
    assert set(ALL_LABELS) <= set(cells)
    assert "<script>" not in styled and "<b>" not in styled


def test_tensorboard_tags_are_one_line_and_keep_their_levels(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert tags and all("\n" not in t and "\r" not in t for t in tags)
    assert tag("accent/region\r") == "accent\u2215region\\r"


def test_errors_and_log_lines_show_control_characters_escaped(corpus, tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus.parent, copy)
    victim = next(p for p in copy.iterdir() if p.suffix == ".wav")
    victim.write_bytes(b"not audio")
    with pytest.raises(ManifestError) as caught:
        read_manifest(copy / "manifest.csv", progress=False, use_cache=False)
    status, message = describe_error(caught.value)
    assert status == 1 and "\r" not in message
    [line] = [m for m in message.split("\n") if "not a readable audio file" in m]
    assert one_line(victim.name) in line and "\\r" in line
    assert one_line("a\rb\nc\x1b[2J\x00\u2028") == "a\\rb\\nc\\x1b[2J\\0\\u2028"
    assert one_line(UNICODE) == UNICODE  # printable text of any script is kept as is
    assert plot_label("$x$") == r"\$x\$"
    assert re.fullmatch(r"[^\r\n]*", plot_label(HOSTILE["east"]))


def test_log_lines_name_a_hostile_file_on_one_line(corpus):
    import logging

    from voxlib.cli import log_to

    logger = logging.getLogger("voxlib")
    before = logger.handlers[:], logger.propagate, logger.level
    stream = io.StringIO()
    log_to(stream)
    try:
        name = hostile_name("north0", 0)
        logging.getLogger("voxlib.predict").warning("%s: skipped: %s", corpus.parent / name, "bad\x1b[2J")
    finally:
        logger.handlers[:], logger.propagate, logger.level = before
    [line] = stream.getvalue().splitlines()
    assert line == f"{one_line(corpus.parent / name)}: skipped: bad\\x1b[2J"
