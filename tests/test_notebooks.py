"""The notebooks, executed for real with papermill on generated corpora (kernel starts are slow, so
the full 01 -> 03 chain runs once per session and every check on its HTML shares that run)."""
import ast
import csv
import json
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest
import soundfile as sf
from corpus_fixtures import (make_accent_archive_tree, make_common_voice_tree, make_csj_tree, make_jvs_tree,
                             make_vctk_tree)

from voxlib import explore
from voxlib.config import Config, ConfigError
from voxlib.corpora.common import ADAPTERS
from voxlib.notebook import prepare
from voxlib.index_page import NOTEBOOKS, headline
from voxlib.report import main, run_notebook, run_report, this_interpreter_kernel

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
EVIL = "<script>alert(1)</script>"
FAST = {"width": 0.0625, "epochs": 2, "eval_crops": 1, "batch_size": 16}


def _copy_corpus(source: Path, target: Path, rename: dict[str, str] | None = None) -> Path:
    """A writable copy of a corpus; ``rename`` replaces birthplace labels in the manifest."""
    shutil.copytree(source.parent, target)
    manifest = target / "manifest.csv"
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["birthplace"] = (rename or {}).get(row["birthplace"], row["birthplace"])
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


# --- committed notebooks ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean_and_its_parameters_are_config_defaults(name):
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is None and not c.outputs for c in code), f"{name} has outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], f"{name}: the first code cell must be the only parameters cell"
    defaults = Config().to_dict()
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(tagged[0].source).body}
    assert assigned and all(defaults[k] == v for k, v in assigned.items()), assigned
    assert "Config.from_namespace(globals())" in code[1].source  # the cell right after checks them
    # a cell without an id makes nbformat warn on every run of the report (read the raw JSON: nbformat fills them in)
    ids = [c.get("id") for c in json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())["cells"]]
    assert None not in ids and len(set(ids)) == len(ids), ids


def test_prepare_names_a_missing_manifest_or_run(tmp_path):
    with pytest.raises(ConfigError, match="parameter 'manifest': no such file .*nowhere.csv"):
        prepare(Config(manifest=str(tmp_path / "nowhere.csv")))
    with pytest.raises(ConfigError, match=r"parameter 'run_dir': .*not a vox run folder \(no config\.json\)"):
        prepare(Config(run_dir=str(tmp_path)), need="run")
    with pytest.raises(ConfigError, match=r"parameter 'run_dir': .*nowhere: no such folder; train first"):
        prepare(Config(run_dir=str(tmp_path / "nowhere")), need="run")


# --- the full chain, once ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain(tiny_corpus, tmp_path_factory):
    """notebooks 01 -> 03 via report.py on the tiny corpus, one birthplace named like an XSS payload."""
    root = tmp_path_factory.mktemp("chain")
    manifest = _copy_corpus(tiny_corpus, root / "corpus", {"east": EVIL})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VOX_OUTPUTS", str(root / "outputs"))
        report = run_report(str(manifest), str(root / "run"), dict(FAST, cache_dir=str(root / "cache")),
                            progress=False)
    return report


def test_chain_runs_every_notebook_and_writes_html(chain):
    assert chain.ok, [s.error for s in chain.stages]
    for name in NOTEBOOKS:
        assert (chain.run_dir / "notebooks" / f"{name}.ipynb").exists()
        assert (chain.run_dir / "reports" / f"{name}.html").stat().st_size > 10_000
    index = chain.index.read_text()
    assert all(f'href="{name}.html"' in index for name in NOTEBOOKS)


def test_train_report_has_learning_curves_and_the_accuracy_table(chain):
    page = (chain.run_dir / "reports" / "02_train.html").read_text()
    assert page.count("<img") >= 2  # cross-entropy and accuracy figures
    table = page.split("Final accuracies")[1]
    assert "majority" in table and "chance" in table
    assert all(re.search(rf">{head}\s*</td>", table) for head in ("speaker", "birthplace", "sex"))
    assert re.search(r">\d{1,3}\.\d%\s*</td>", table)  # shares as percent, one decimal


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_reports_have_no_stderr_block(chain, name):
    """Progress bars and warnings on stderr would show as pink blocks in the HTML."""
    nb = nbformat.read(chain.run_dir / "notebooks" / f"{name}.ipynb", as_version=4)
    streams = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream"]
    assert [o["name"] for o in streams if o["name"] == "stderr"] == [], [o["text"][:200] for o in streams]


def test_birthplace_report_leads_with_the_verdict_hides_code_and_has_the_confusion_matrix(chain):
    page = (chain.run_dir / "reports" / "03_birthplace.html").read_text()
    verdict = page.split(">Verdict<", 1)[1].split("Headline: the discriminator beside reference baselines")[0]
    assert "<li>" in verdict and "<img" not in verdict and "<table" not in verdict
    headline = page.split("Headline: the discriminator beside reference baselines")[1].split("Pooled over folds")[0]
    assert ">mfcc<" in headline and ">discriminator<" in headline and ">one run<" in headline
    section = page.split("Birthplace confusion matrices")[1].split("Per-class precision")[0]
    assert "<img" in section
    assert "top3" in page and "balanced_accuracy" in page
    assert "birthplace_report" not in page and "hl-ipython3" not in page  # no code cell
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", page)
    assert cells and not [c for c in cells if re.search(r"\d[eE][+-]\d", c)]  # no scientific notation in a table
    code = (chain.run_dir / "reports" / "03_birthplace-code.html").read_text()
    assert "birthplace_report" in code and "hl-ipython3" in code and 'href="03_birthplace.html"' in code


def test_corpus_labels_are_escaped_everywhere(chain):
    pages = [chain.index] + [chain.run_dir / "reports" / f"{n}.html" for n in NOTEBOOKS]
    for page in pages:
        text = page.read_text()
        assert EVIL not in text, page.name
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in (chain.run_dir / "reports" / "01_explore.html").read_text()


def test_headline_numbers_cover_every_head_on_both_test_sets(chain):
    table = headline(chain.run_dir)
    assert set(table["head"]) == {"speaker", "birthplace", "sex"}
    assert set(table["split"]) == {"seen_test", "unseen_test"}
    assert ((table["accuracy"] >= 0) & (table["accuracy"] <= 1)).all()


def test_a_pooled_folder_is_reported_pooled_with_its_interval(tiny_corpus, tmp_path, monkeypatch, capsys):
    """folds=2 through report.py: 02 trains both folds while the terminal shows each fold and epoch, 03 and
    index.html report the pooled numbers beside the reference baselines, and every number of the verdict
    says whether it is pooled or one fold's."""
    import json

    monkeypatch.setenv("VOX_OUTPUTS", str(tmp_path / "outputs"))
    report = run_report(str(tiny_corpus), str(tmp_path / "run"), dict(FAST, epochs=1, folds=2,
                                                                    cache_dir=str(tmp_path / "cache")))
    assert report.ok, [s.error for s in report.stages]
    terminal = capsys.readouterr().out.splitlines()
    assert terminal[0].startswith("01_explore ... ok in") and terminal[1] == "02_train ..."
    assert "  member 1 of 2: fold0 (fold 1 of 2, seed 0)" in terminal
    assert any(line.startswith("  fold0 epoch 1/1 (") and "[1/2 epochs, about " in line for line in terminal), terminal
    assert any(line.startswith("  fold1 epoch 1/1 (") and line.endswith("[2/2 epochs]") for line in terminal), terminal
    assert [line.split(" ok in")[0] for line in terminal if " ok in " in line] == [
        "01_explore ...", "02_train", "03_birthplace ..."]
    assert (report.run_dir / "fold0" / "summary.json").is_file() and (report.run_dir / "fold1" / "summary.json").is_file()
    unseen = json.loads((report.run_dir / "pooled.json").read_text())["birthplace"]["unseen"]
    stated = f"{unseen['accuracy']:.1%} [{unseen['low']:.1%}, {unseen['high']:.1%}]"
    index = report.index.read_text()
    found = index.split("What the run found")[1].split("<h2>")[0]
    assert "<b>Pooled over 2 folds</b>" in found and "<th>MFCC statistics + logistic regression</th>" in found
    assert stated in found.split("<td>birthplace</td><td>unseen</td>")[1].split("</tr>")[0]
    verdict = index.split("Verdict: what the birthplace head learned")[1].split("</ul>")[0]
    assert "pooled over 2 folds x 1 seed(s)" in verdict  # copied from notebook 03
    for line in verdict.split("<li>")[1:]:
        assert "%" not in line or any(where in line for where in ("pooled over 2 folds", "fold0 only)",
                                                                     "speakers of the corpus held out")), line
    settings = index.split("Settings of this run")[1]
    run_dir = settings.split("<td>run_dir</td>")[1].split("</tr>")[0]
    assert str(report.run_dir) in run_dir and "fold0" not in run_dir
    page = (report.run_dir / "reports" / "03_birthplace.html").read_text()
    assert page.index(">Verdict<") < page.index("Headline: the discriminator") < page.index("One run in detail")
    assert "Pooled over folds and seeds" in page and "unseen_low" in page and "fold0 only, one of 2 runs" in page
    assert "pooled over 2 runs, each fitted on its own split" in page  # the reference baselines
    assert f"{unseen['accuracy']:.1%} [{unseen['low']:.1%}" in page  # the verdict: percent with one decimal
    assert "seen_std_over_seeds" not in page  # one seed: no spread over seeds, no empty column
    train_page = (report.run_dir / "reports" / "02_train.html").read_text()
    assert "fold0 only, one of 2 runs" in train_page and "final accuracy of each run" in train_page
    assert "it/s]" not in train_page and "%|" not in train_page  # no progress bar reached the HTML


# --- failures -------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    ({"batch_sise": 4}, "unknown parameter(s) ['batch_sise']"),
    ({"epochs": "ten"}, "'epochs' must be int, got str 'ten'"),
])
def test_a_bad_parameter_stops_the_notebook_in_its_first_cells(params, message, tmp_path):
    """Papermill injects any name; the notebook's own check (not report.py's) must catch it."""
    with this_interpreter_kernel() as kernel:
        stage = run_notebook("03_birthplace", params, tmp_path / "run", kernel, NOTEBOOK_DIR)
    # In [1] is the parameters cell, In [2] the one papermill injects, In [3] the check
    assert "03_birthplace.ipynb failed in cell In [3], line 4: cfg = prepare(Config.from_namespace" in stage.error
    assert "ConfigError" in stage.error and message in stage.error
    assert stage.html.exists() and "ConfigError" in stage.html.read_text()


def test_a_failing_notebook_names_notebook_and_cell_and_still_writes_html(tiny_corpus, tmp_path, capsys):
    manifest = _copy_corpus(tiny_corpus, tmp_path / "corpus")
    (tmp_path / "corpus" / "north1" / "north1_002.wav").unlink()
    code = main(["--manifest", str(manifest), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert "01_explore.ipynb failed in cell In [4], line 7: corpus = explore.load(cfg)" in err
    assert "ManifestError" in err and "north1_002.wav" in err
    html = (tmp_path / "run" / "reports" / "01_explore.html").read_text()
    assert "north1_002.wav" in html and "ManifestError" in html
    assert not (tmp_path / "run" / "reports" / "02_train.html").exists()
    assert "not run" in (tmp_path / "run" / "reports" / "index.html").read_text()


# --- notebook 01 on every adapter's output ---------------------------------------------------------
ADAPTER_TREES = {
    "csj": (make_csj_tree, {"dialogues": True}),  # start/end segments of long talks
    "vctk": (make_vctk_tree, {}),
    "accent_archive": (make_accent_archive_tree, {"window": 1.0}),  # windows of long recordings
    "common_voice": (make_common_voice_tree, {}),  # mp3
    "jvs": (make_jvs_tree, {}),  # no birthplace column
}


def test_explore_notebook_runs_on_every_adapter_output(tmp_path):
    """One papermill run of notebook 01 per adapter, in one test so the kernel cost is in one place."""
    assert sorted(ADAPTER_TREES) == sorted(ADAPTERS)
    with this_interpreter_kernel() as kernel:
        for name, (make_tree, options) in ADAPTER_TREES.items():
            summary = ADAPTERS[name](make_tree(tmp_path / name), None, progress=False, **options)
            out = tmp_path / f"{name}.ipynb"
            pm.execute_notebook(str(NOTEBOOK_DIR / "01_explore.ipynb"), str(out), kernel_name=kernel,
                                parameters={"manifest": str(summary.manifest)}, progress_bar=False,
                                cwd=str(NOTEBOOK_DIR))
            text = "".join(o.get("text", "") + "".join(str(v) for v in o.get("data", {}).values())
                           for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []))
            assert f"{summary.utterances} utterances, {summary.speakers} speakers" in text, name
            if name == "jvs":
                assert "no birthplace labels" in text


# --- explore.py (what notebook 01 shows), without a kernel -----------------------------------------
def test_exploration_tables_count_utterances_speakers_and_audio(tiny_corpus):
    corpus = explore.load(Config(manifest=str(tiny_corpus)))
    table = corpus.table
    seconds = sum(sf.info(p).duration for p in table["path"])
    by_place = explore.summary(table, "birthplace")
    assert list(by_place["utterances"]) == [24, 24, 24] and list(by_place["speakers"]) == [4, 4, 4]
    assert by_place["minutes"].sum() * 60 == pytest.approx(seconds, rel=1e-3)
    balance = explore.speakers_per_birthplace(table)
    assert balance.loc["north"].to_dict() == {"female": 2, "male": 2, "speakers": 4}
    assert explore.totals(table) == {"utterances": 72, "speakers": 12, "birthplaces": 3,
                                     "hours": pytest.approx(seconds / 3600, rel=1e-3)}
    assert explore.validation_report(corpus)["rejected"] == 0


def test_exploration_copes_with_segments_and_a_missing_birthplace(tiny_corpus):
    clip = str(tiny_corpus.parent / "north0" / "north0_000.wav")
    table = pd.DataFrame({"path": [clip, clip, clip], "speaker": ["a", "a", "b"], "sex": ["male", "male", ""],
                          "start": [0.5, float("nan"), 0.0], "end": [1.25, 1.0, float("nan")]})
    full = sf.info(clip).duration
    assert list(explore.durations(table)) == pytest.approx([0.75, 1.0, full], abs=1e-3)
    assert not explore.has_labels(table, "birthplace")
    assert explore.summary(table, "sex").loc["(none)", "utterances"] == 1  # counted, not dropped
    assert explore.example_groups(table, 4) == [("(none)", "(none)"), ("(none)", "male")]
    wave = explore.load_wave(table.iloc[0], Config())
    assert len(wave) == 12000  # 0.75 s at 16 kHz


def test_example_panels_cover_every_birthplace_before_repeating_one():
    table = pd.DataFrame({"birthplace": list("aabbcc"), "sex": ["female", "male"] * 3})
    assert explore.example_groups(table, 3) == [("a", "female"), ("b", "male"), ("c", "female")]
    assert len(set(explore.example_groups(table, 10))) == 6
