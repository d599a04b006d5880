"""report.py without a kernel: parameter checks, HTML export, index.html (numbers and escaping)."""
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from voxlib.cli import run_command
from voxlib.config import ConfigError
from voxlib.notebook import HEADLINE_MIME, escape_markdown
from voxlib.index_page import Report, Stage, write_index
from voxlib.report import export_html, main, notebook_parameters, parse_value

EVIL = "<script>alert(1)</script>"
# A 1x1 red PNG, so the export test needs no matplotlib.
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")


def test_parameter_values_are_typed_like_papermill_but_strings_stay_verbatim():
    assert parse_value("epochs", "3") == 3
    assert parse_value("lr", "1e-4") == 1e-4
    assert parse_value("compile", "True") is True
    assert parse_value("epochs", "ten") == "ten"  # reaches Config as a str: a wrong type, reported
    assert parse_value("run_dir", "2024") == "2024"  # a str field is never turned into a number
    assert parse_value("not_a_field", "7") == 7


@pytest.mark.parametrize("params, message", [
    ({"batch_sise": 4}, "unknown parameter(s) ['batch_sise']"),
    ({"epochs": "ten"}, "'epochs' must be int, got str 'ten'"),
    ({"manifest": "nowhere/manifest.csv"}, "parameter 'manifest': no such file"),
])
def test_bad_parameters_stop_before_any_kernel_starts(params, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        notebook_parameters(params=params, cwd=tmp_path)
    assert message in str(err.value)


def test_command_line_reports_a_bad_parameter_by_name(capsys):
    assert run_command(main, ["-p", "epochs", "ten"]) == 2
    assert capsys.readouterr().err == "error: parameter 'epochs' must be int, got str 'ten'\n"
    assert run_command(main, ["-p", "batch_sise", "4"]) == 2
    assert "'batch_sise' -> did you mean 'batch_size'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--epochs", "ten"])  # a typed flag is checked by the parser itself
    assert exit_.value.code == 2 and "--epochs: must be int, got 'ten'" in capsys.readouterr().err


def test_paths_become_absolute_against_the_working_directory(tiny_corpus, tmp_path):
    rel = Path("..") / "manifest.csv"
    values = notebook_parameters(str(rel), "runs/a", {"cache_dir": "cache"}, cwd=tiny_corpus.parent / "x")
    assert values["manifest"] == str(tiny_corpus)
    assert values["run_dir"] == str(tiny_corpus.parent / "x" / "runs" / "a")
    assert values["cache_dir"] == str(tiny_corpus.parent / "x" / "cache")


def test_default_run_folder_is_under_outputs_named_after_the_corpus(tiny_corpus, tmp_path):
    values = notebook_parameters(str(tiny_corpus))
    assert values["run_dir"] == str(tmp_path / "outputs" / "runs" / tiny_corpus.parent.name)


def test_markdown_escaping_neutralises_html_and_formatting():
    assert escape_markdown(EVIL) == "&lt;script&gt;alert\\(1\\)&lt;/script&gt;"
    assert escape_markdown("a*b_c [x](y)") == "a\\*b\\_c \\[x\\]\\(y\\)"


def test_html_export_is_self_contained(tmp_path):
    nb = new_notebook(cells=[new_code_cell("plot()", outputs=[
        new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})])])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = tmp_path / "nb.ipynb"
    nbformat.write(nb, source)
    page = export_html(source, tmp_path / "out" / "nb.html").read_text()
    assert "<img" in page and "data:image/png;base64," + PNG[:20] in page
    assert "<script src=" not in page and "cdn" not in page.lower()


def test_the_report_page_hides_code_and_links_to_the_page_with_code(tmp_path):
    nb = new_notebook(cells=[new_code_cell("secret_variable = 41 + 1\nsecret_variable", execution_count=1, outputs=[
        new_output("execute_result", data={"text/plain": "42"}, execution_count=1)])])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = tmp_path / "nb.ipynb"
    nbformat.write(nb, source)
    report = export_html(source, tmp_path / "nb.html", code=False, other_page=tmp_path / "nb-code.html").read_text()
    code = export_html(source, tmp_path / "nb-code.html", code=True, other_page=tmp_path / "nb.html").read_text()
    assert "42" in report and "secret_variable" not in report and "In&nbsp;[" not in report
    assert 'href="nb-code.html"' in report and "Show the code" in report
    assert "secret_variable" in code and 'href="nb.html"' in code and "Hide the code" in code


def _run_with_evil_label(root: Path) -> Path:
    """A synthetic run whose largest birthplace class is called like an XSS payload."""
    from run_folder_factory import make_run_folder

    run = make_run_folder(root / "run", speakers=(6, 3, 3), birthplace_seen=1.0, birthplace_unseen=1.0)
    for name in ("labels.json", "splits.csv", "predictions.csv"):
        path = run / name
        path.write_text(path.read_text().replace("place00", EVIL))
    return run


def test_index_shows_headline_numbers_and_escapes_labels(tmp_path):
    run = _run_with_evil_label(tmp_path)
    stages = [Stage(n, run / "notebooks" / f"{n}.ipynb", run / "reports" / f"{n}.html", 1.5)
              for n in ("01_explore", "02_train")]
    stages[1].error = f"02_train.ipynb failed in cell In [4]: KeyError: '{EVIL}'"
    report = Report(run, run / "reports" / "index.html", stages)
    page = write_index(report, {"manifest": f"/data/{EVIL}/manifest.csv"}).read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # every head on both test sets, beside its majority baseline (the evil class is the majority)
    for head in ("speaker", "birthplace", "sex"):
        assert f"<td>{head}</td><td>seen_test</td>" in page
    assert "<td>birthplace</td><td>unseen_test</td>" in page
    assert "majority baseline" in page
    birthplace_seen = page.split("<td>birthplace</td><td>seen_test</td>")[1].split("</tr>")[0]
    assert "<b>100.0%</b>" in birthplace_seen and "50.0% (&lt;script&gt;" in birthplace_seen
    assert "03_birthplace</td><td></td><td></td><td>not run" in page


def test_index_leads_with_the_published_headline_beside_the_reference_baselines(tmp_path):
    """Notebook 03 publishes its headline table as data; index.html shows it first, with the reference
    baseline columns, the pooled interval, the best number of each row in bold, and every label escaped."""
    run = _run_with_evil_label(tmp_path)
    columns = ["head", "speakers", "scope", "n", "discriminator", "low", "high", "mfcc", "majority", "chance"]
    rows = [["birthplace", "seen", "pooled over 3 folds", 960, 0.953, None, None, 0.958, 0.125, 0.125],
            ["birthplace", "unseen", "pooled over 3 folds", 1920, 0.256, 0.174, 0.353, 0.594, 0.125, 0.125],
            [EVIL, "unseen", "pooled over 3 folds", 1920, 0.997, 0.993, 1.0, 0.95, 0.5, 0.5]]
    executed = run / "notebooks" / "03_birthplace.ipynb"
    executed.parent.mkdir(parents=True)
    nb = new_notebook(cells=[new_code_cell("publish_headline(table)", outputs=[new_output("display_data", data={
        "text/html": "<table></table>", HEADLINE_MIME: {"columns": columns, "rows": [dict(zip(columns, r)) for r in rows]}})])])
    nbformat.write(nb, executed)
    stages = [Stage(n, run / "notebooks" / f"{n}.ipynb", run / "reports" / f"{n}.html", 1.5)
              for n in ("01_explore", "02_train", "03_birthplace")]
    page = write_index(Report(run, run / "reports" / "index.html", stages), {}).read_text()
    assert page.index("What the run found") < page.index("<h2>Reports</h2>") < page.index("Settings of this run")
    assert "<th>MFCC statistics + logistic regression</th>" in page and "encoder" not in page
    unseen = page.split("<td>birthplace</td><td>unseen</td>")[1].split("</tr>")[0]
    assert "25.6% [17.4%, 35.3%]" in unseen and "<td class='num best'>59.4%</td>" in unseen
    seen = page.split("<td>birthplace</td><td>seen</td>")[1].split("</tr>")[0]
    assert "<td class='num'>95.3%</td>" in seen and "[" not in seen  # no interval on seen speakers
    assert "<b>Pooled over 3 folds</b>" in page
    assert EVIL not in page and "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in page
