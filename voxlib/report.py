"""Run the three notebooks (explore -> train -> birthplace) and export each to one HTML file.

    python -m voxlib.report [--manifest PATH] [--run-dir DIR] [--epochs N ...] [-p NAME VALUE ...]

With no arguments (``make demo``) it uses the built-in demo corpus and ``outputs/runs/<corpus>``.
Every flag (``--epochs 2``) and every ``-p`` name (``-p epochs 2``, papermill's spelling) is a field
of ``voxlib.config.Config`` and goes to all three notebooks, so one value means the same in each. Executed notebooks go to ``DIR/notebooks/``, self-contained HTML (images
embedded) to ``DIR/reports/``, and ``DIR/reports/index.html`` links them with the run's headline
numbers.

Paths given here are resolved against the current directory and handed to the notebooks as absolute
paths (inside a notebook a relative path means relative to the project root; see voxlib.notebook).
The kernel is this interpreter: a throw-away ``python3`` kernelspec pointing at ``sys.executable``
(with this voxlib first on its path) shadows any installed one for the duration of the run, so the
notebooks never import a different voxlib than the one running this command. The notebooks are the
checkout's ``notebooks/`` when voxlib runs from a checkout (edits show), else the copies installed
inside the package (``voxlib/notebooks/``), so the command works from any folder.

A failing notebook stops the chain; the error names the notebook and the cell, the part that ran is
still exported to HTML, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import html
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

from voxlib.config import Config, ConfigError, field_info
from voxlib.baselines import REPRESENTATIONS
from voxlib.notebook import HEADLINE_MIME, PATH_FIELDS
from voxlib.progress import PROGRESS_FILE_ENV, TrainingProgress, follow
from voxlib import runfolder
from voxlib.corpora.source import default_run_dir
from voxlib.text import percent

NOTEBOOKS = ("01_explore", "02_train", "03_birthplace")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding voxlib/


class _EveryFieldIsAParameter(logging.Filter):
    """Papermill warns about names missing from a notebook's parameters cell; in vox every Config
    field is a parameter of every notebook (Config.from_namespace checks them), so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


logging.getLogger("papermill").addFilter(_EveryFieldIsAParameter())
KERNEL_NAME = "python3"
CODE_SUFFIX = "-code"  # reports/NAME-code.html: the report with its code cells
TQDM_MININTERVAL_S = "15"  # progress bars inside notebooks: few updates, so stored outputs stay small


class ReportError(RuntimeError):
    """A notebook failed; the message names the notebook and the cell."""


@dataclass
class Stage:
    """One notebook of the chain: where its outputs went, how long it took, what went wrong."""

    name: str
    executed: Path
    html: Path  # the report: outputs only
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def code_html(self) -> Path:
        """The same report with every code cell, for a reader who wants to see how a number was made."""
        return self.html.with_name(f"{self.name}{CODE_SUFFIX}.html")


@dataclass
class Report:
    run_dir: Path
    index: Path
    stages: list[Stage]

    @property
    def ok(self) -> bool:
        return len(self.stages) == len(NOTEBOOKS) and all(s.ok for s in self.stages)


# --- parameters ------------------------------------------------------------------------------------
def parse_value(name: str, text: str) -> Any:
    """A ``-p`` value as the notebook should see it.

    String fields keep the text verbatim (a run folder may be called ``2024``); everything else is
    read the way the papermill CLI reads it (``3`` -> int, ``1e-4`` -> float, ``True`` -> bool), so a
    wrong value such as ``-p epochs ten`` reaches Config as a str and is reported as a wrong type.
    """
    types = {f.name: f.type for f in fields(Config)}
    if types.get(name) == "str":
        return text
    if text in ("True", "False"):
        return text == "True"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def notebook_parameters(manifest: str = "", run_dir: str = "", params: dict[str, Any] | None = None,
                        cwd: Path | None = None) -> dict[str, Any]:
    """Check every parameter before a kernel starts; return them with absolute paths.

    The notebooks check again (they can run without this command), but failing here costs
    milliseconds instead of a kernel start.
    """
    values = dict(params or {})
    if manifest:
        values["manifest"] = manifest
    if run_dir:
        values["run_dir"] = run_dir
    cfg = Config.from_dict(values)  # unknown names and wrong types raise ConfigError here
    cwd = Path(cwd or Path.cwd())
    for name in PATH_FIELDS:
        if getattr(cfg, name):
            values[name] = str((cwd / Path(getattr(cfg, name)).expanduser()).resolve())
    if values.get("manifest") and not Path(values["manifest"]).is_file():
        raise ConfigError(f"parameter 'manifest': no such file {values['manifest']}")
    if values.get("compare_run_dir") and not Path(values["compare_run_dir"]).is_dir():
        raise ConfigError(f"parameter 'compare_run_dir': no such folder {values['compare_run_dir']}")
    if not values.get("run_dir"):
        values["run_dir"] = str(default_run_dir(dataclasses.replace(cfg, **values)))
    return values


def find_notebooks() -> Path:
    """The checkout's notebooks/ beside voxlib/, else the copies the wheel installs in voxlib/notebooks/."""
    for folder in (PACKAGE_ROOT / "notebooks", PACKAGE_ROOT / "voxlib" / "notebooks"):
        if all((folder / f"{name}.ipynb").is_file() for name in NOTEBOOKS):
            return folder
    raise ReportError(f"the notebooks {', '.join(NOTEBOOKS)} are neither in {PACKAGE_ROOT / 'notebooks'} nor "
                      f"installed in {PACKAGE_ROOT / 'voxlib' / 'notebooks'}; reinstall voxlib")


# --- kernel ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def this_interpreter_kernel() -> Iterator[str]:
    """Make kernel ``python3`` mean ``sys.executable`` while the notebooks run, and give the kernels a
    progress file for their training log lines (voxlib.progress)."""
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "TQDM_MININTERVAL", "TQDM_DISABLE", PROGRESS_FILE_ENV)}
    saved_path = os.environ.get("PYTHONPATH")
    with tempfile.TemporaryDirectory(prefix="vox-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        spec = {
            # kernel-app log lines (e.g. the local-TCP notice) would drown the one-line-per-notebook progress
            "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "--log-level=ERROR",
                     "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
        }
        if (PACKAGE_ROOT / "pyproject.toml").is_file():  # a checkout: its voxlib, not an installed one
            spec["env"] = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), saved_path]))}
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [tmp, saved["JUPYTER_PATH"]]))
        os.environ.setdefault("TQDM_MININTERVAL", TQDM_MININTERVAL_S)
        os.environ.setdefault("TQDM_DISABLE", "1")  # a bar in stored HTML is a frozen line of stderr
        os.environ[PROGRESS_FILE_ENV] = str(Path(tmp) / "progress.log")  # the kernels' training log lines
        try:
            yield KERNEL_NAME
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# --- execution and export --------------------------------------------------------------------------
def describe_failure(notebook: str, err: BaseException) -> str:
    """One readable paragraph: which notebook, which cell (as numbered in the HTML), which line."""
    from papermill.exceptions import PapermillExecutionError, strip_color

    if isinstance(err, PapermillExecutionError):
        # IPython marks the failing line of the cell with an arrow: "----> 7 corpus = ..."
        arrow = re.search(r"^-+> *(\d+) (.*)$", strip_color("\n".join(err.traceback or [])), re.M)
        lines = [ln.strip() for ln in (err.source or "").splitlines() if ln.strip()]
        where = f", line {arrow.group(1)}: {arrow.group(2).strip()}" if arrow else f": {lines[0] if lines else ''}"
        return f"{notebook}.ipynb failed in cell In [{err.exec_count}]{where}\n{err.ename}: {err.evalue}"
    return f"{notebook}.ipynb failed: {type(err).__name__}: {err}"


# JupyterLab's HTML template minus the scripts it loads from a CDN (MathJax, require.js, mermaid): the
# notebooks need none of them, and a report must open offline. A report page without code links to the
# page with code and back (resources["vox_other_page"]).
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block extra_css %}<style>
.vox-other-page { font-family: sans-serif; font-size: 0.9em; margin: 1em 0 0 var(--jp-cell-prompt-width, 0); }
</style>{% endblock extra_css %}
{%- block body_header -%}
{{ super() }}
{%- if resources.vox_other_page -%}
<p class="vox-other-page"><a href="{{ resources.vox_other_page.href }}">{{ resources.vox_other_page.text }}</a></p>
{%- endif -%}
{%- endblock body_header -%}
"""


def export_html(notebook: Path, target: Path, code: bool = True, other_page: Path | None = None) -> Path:
    """One self-contained HTML file: styles inline, figures and audio as embedded data.

    ``code=False`` leaves out every code cell's input and the In/Out prompts: the page reads as a report
    (text, tables, figures). ``other_page`` is linked at the top (the same notebook with or without code).
    """
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook, as_version=4)
    exporter = HTMLExporter(embed_images=True, template_file="vox_offline.html.j2",
                            extra_loaders=[jinja2.DictLoader({"vox_offline.html.j2": _OFFLINE_TEMPLATE})],
                            exclude_input=not code, exclude_input_prompt=not code, exclude_output_prompt=not code)
    resources = {}
    if other_page is not None:
        text = "Show the code: the same report with every code cell" if not code else "Hide the code"
        resources["vox_other_page"] = {"href": other_page.name, "text": text}
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target


def run_notebook(name: str, values: dict[str, Any], run_dir: Path, kernel: str,
                 notebooks_dir: Path) -> Stage:
    import papermill as pm

    stage = Stage(name, run_dir / "notebooks" / f"{name}.ipynb", run_dir / "reports" / f"{name}.html")
    stage.executed.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(notebooks_dir / f"{name}.ipynb"), str(stage.executed), parameters=values,
            kernel_name=kernel, cwd=str(notebooks_dir), progress_bar=False,
        )
    except Exception as err:  # a failed cell, a dead kernel, a timeout: all stop the chain
        stage.error = describe_failure(name, err)
    stage.seconds = time.perf_counter() - start
    if stage.executed.exists():  # papermill saves the notebook up to the failing cell
        export_html(stage.executed, stage.html, code=False, other_page=stage.code_html)
        export_html(stage.executed, stage.code_html, code=True, other_page=stage.html)
    return stage


def run_report(manifest: str = "", run_dir: str = "", params: dict[str, Any] | None = None,
               notebooks_dir: Path | None = None, progress: bool = True) -> Report:
    """Execute 01 -> 03 and write the HTML reports; stop at the first failing notebook.

    The run folder itself is kept (training resumes or finds it finished); only the executed
    notebooks and reports of an earlier call are removed, so no stale page is mistaken for this one.
    """
    values = notebook_parameters(manifest, run_dir, params)
    run = Path(values["run_dir"])
    notebooks_dir = Path(notebooks_dir) if notebooks_dir else find_notebooks()
    runfolder.claim(run)  # the executed notebooks and reports live in the run folder: vox's own
    for name in NOTEBOOKS:
        for stale in (run / "notebooks" / f"{name}.ipynb", run / "reports" / f"{name}.html",
                      run / "reports" / f"{name}{CODE_SUFFIX}.html"):
            stale.unlink(missing_ok=True)
    stages: list[Stage] = []
    cfg = Config.from_dict(values)
    terminal = Terminal(sys.stdout if progress else None)
    with this_interpreter_kernel() as kernel:
        for name in NOTEBOOKS:
            terminal.start(name)
            training = TrainingProgress(cfg.folds * cfg.seeds, cfg.epochs)
            with follow(os.environ[PROGRESS_FILE_ENV], terminal.detail, training):
                stage = run_notebook(name, values, run, kernel, notebooks_dir)
            stages.append(stage)
            terminal.end(f"{'ok' if stage.ok else 'FAILED'} in {stage.seconds:.1f} s")
            if not stage.ok:
                break
    report = Report(run, run / "reports" / "index.html", stages)
    write_index(report, values)
    return report


class Terminal:
    """One line per notebook (``02_train ... ok in 668.0 s``) with the training's lines indented below
    its name while it runs; nothing at all for ``stream=None``."""

    def __init__(self, stream):
        self.stream, self.name, self.open = stream, "", False

    def _print(self, text: str = "", end: str = "\n") -> None:
        if self.stream is not None:
            print(text, end=end, file=self.stream, flush=True)

    def start(self, name: str) -> None:
        self.name, self.open = name, True
        self._print(f"{name} ...", end="")

    def detail(self, line: str) -> None:
        if self.open:  # the name's line is still waiting for its result
            self._print()
            self.open = False
        self._print(f"  {line}")

    def end(self, result: str) -> None:
        self._print(f" {result}" if self.open else f"{self.name} {result}")
        self.open = False


# --- index.html ------------------------------------------------------------------------------------
HEADLINE_SPLITS = ("seen_test", "unseen_test")


def headline(run_dir: Path) -> "pd.DataFrame | None":
    """Per head and test set: accuracy beside chance and the majority baseline; None without a run."""
    from voxlib.evaluate import accuracy_table, load_run

    if not (Path(run_dir) / "predictions.csv").exists():
        return None
    return accuracy_table(load_run(run_dir), splits=HEADLINE_SPLITS)


def training_seconds(run_dir: Path) -> float | None:
    """Wall time the trainer logged (sum of the per-epoch ``seconds`` rows of metrics.csv; of every
    member's for a pooled folder)."""
    import pandas as pd

    paths = [m / runfolder.METRICS for m in _members(run_dir)] or [Path(run_dir) / runfolder.METRICS]
    paths = [p for p in paths if p.exists()]
    if not paths:
        return None
    metrics = pd.concat([pd.read_csv(p) for p in paths])
    return float(metrics.loc[metrics["metric"] == "seconds", "value"].sum())


def _members(run_dir: Path) -> list[Path]:
    """The member run folders of a pooled folder (none for a single run)."""
    if not runfolder.is_pooled(run_dir):
        return []
    return [Path(run_dir) / m["name"] for m in runfolder.read_json(Path(run_dir) / runfolder.EXPERIMENT)["members"]]


def write_index(report: Report, values: dict[str, Any]) -> Path:
    """The page ``make demo`` prints: the finding first (the headline table with the reference baselines,
    then the verdict), then the reports, then the settings the run used."""
    esc = html.escape
    rows = []
    for stage in report.stages:
        link = (f'<a href="{esc(stage.html.name)}">{esc(stage.name)}</a>' if stage.html.exists()
                else esc(stage.name))
        code = f'<a href="{esc(stage.code_html.name)}">with code</a>' if stage.code_html.exists() else ""
        status = "ok" if stage.ok else f"<pre class='error'>{esc(stage.error)}</pre>"
        rows.append(f"<tr><td>{link}</td><td>{code}</td><td class='num'>{stage.seconds:.1f} s</td>"
                    f"<td>{status}</td></tr>")
    for name in NOTEBOOKS[len(report.stages):]:
        rows.append(f"<tr><td>{esc(name)}</td><td></td><td></td><td>not run</td></tr>")
    total = sum(s.seconds for s in report.stages)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vox report: {esc(report.run_dir.name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 64em; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }}
table.settings {{ table-layout: fixed; width: 100%; }}
table.settings td {{ overflow-wrap: anywhere; }}  /* long paths wrap instead of widening the page */
.error {{ color: #a00; white-space: pre-wrap; margin: 0; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
td.best {{ font-weight: bold; }}
.note {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>vox report: {esc(report.run_dir.name)}</h1>
<p>Run folder: <code>{esc(str(report.run_dir))}</code></p>
{headline_html(report)}
{verdict_html(report)}
<h2>Reports</h2>
<p class='note'>Each report shows its text, tables and figures; the page "with code" adds the code cells that
made them.</p>
<table><tr><th>report</th><th>code</th><th>wall time</th><th>status</th></tr>
{''.join(rows)}
<tr><td>total</td><td></td><td class='num'>{total:.1f} s</td><td></td></tr></table>
{settings_html(report.run_dir, values)}
</body></html>
"""
    report.index.parent.mkdir(parents=True, exist_ok=True)
    report.index.write_text(page, encoding="utf-8")
    return report.index


def published_headline(executed: Path) -> "pd.DataFrame | None":
    """The headline table notebook 03 published (notebook.publish_headline), or None."""
    import nbformat
    import pandas as pd

    if not Path(executed).is_file():
        return None
    for cell in nbformat.read(executed, as_version=4).cells:
        for output in cell.get("outputs", []):
            found = output.get("data", {}).get(HEADLINE_MIME)
            if found:
                return pd.DataFrame(found["rows"], columns=found["columns"])
    return None


def finding_html(table: "pd.DataFrame", report: Report) -> str:
    """notebook 03's headline table: the discriminator beside the reference baselines on the same folds."""
    esc = html.escape

    def pct(value) -> str:
        return "" if value is None or value != value else percent(value)

    references = [name for name in REPRESENTATIONS if name in table.columns]
    header = "".join(f"<th>{esc(REPRESENTATIONS[name])}</th>" for name in references)
    rows = []
    for r in table.to_dict("records"):
        interval = f" [{pct(r.get('low'))}, {pct(r.get('high'))}]" if pct(r.get("low")) else ""
        scores = {"discriminator": r["discriminator"]} | {name: r.get(name) for name in references}
        best = max((v for v in scores.values() if v is not None), default=None)
        cells = "".join(f"<td class='num{' best' if r.get(name) == best else ''}'>{pct(r.get(name))}</td>"
                        for name in references)
        rows.append(f"<tr><td>{esc(str(r['head']))}</td><td>{esc(str(r['speakers']))}</td>"
                    f"<td class='num'>{int(r['n']):,}</td>"
                    f"<td class='num{' best' if r['discriminator'] == best else ''}'>{pct(r['discriminator'])}"
                    f"{interval}</td>{cells}<td class='num'>{pct(r['majority'])}</td>"
                    f"<td class='num'>{pct(r['chance'])}</td></tr>")
    scopes = sorted(set(table["scope"]))
    where = (": each eligible speaker is unseen in exactly one fold, the interval is 95 % resampled over speakers, "
             "and every reference baseline is fitted on each fold's own training split and pooled the same way"
             if scopes != ["one run"] else ": one split of speakers; every reference baseline is fitted on its "
             "training split")
    return (
        "<h2>What the run found</h2>\n"
        f"<p>Test accuracy per head on held-out utterances of training speakers (seen) and on speakers never trained "
        f"on (unseen): the discriminator beside reference baselines on the same utterances, the majority baseline "
        f"(the most frequent training class) and chance; the best of them in bold.</p>\n"
        f"<p><b>{esc('; '.join(scopes)).capitalize()}</b>{where}.</p>\n"
        f"<table><tr><th>head</th><th>speakers</th><th>n</th><th>discriminator</th>{header}<th>majority</th>"
        "<th>chance</th></tr>\n" + "\n".join(rows) + "</table>\n" + training_wall_html(report)
    )


def training_wall_html(report: Report) -> str:
    seconds = training_seconds(report.run_dir)
    runs = len(_members(report.run_dir))
    source = f"the {runs} runs' metrics.csv" if runs else "metrics.csv"
    return f"<p class='note'>Training wall time (from {source}): {seconds / 60:.1f} min.</p>" if seconds else ""


def headline_html(report: Report) -> str:
    """The headline: notebook 03's table with the reference baselines when it ran, else the run's own
    accuracies; every label string (majority class names) is HTML-escaped."""
    esc = html.escape
    stage = next((s for s in report.stages if s.name == "03_birthplace"), None)
    published = published_headline(stage.executed) if stage is not None else None
    if published is not None and len(published):
        return finding_html(published, report)
    if runfolder.is_pooled(report.run_dir):
        return pooled_headline_html(report)
    try:
        table = headline(report.run_dir)
    except Exception as err:  # a half-written run must not hide the notebook errors above it
        return f"<h2>Headline numbers</h2><p class='error'>cannot read the run: {esc(str(err))}</p>"
    if table is None or table.empty:
        return "<h2>Headline numbers</h2><p>No predictions in the run folder yet.</p>"
    rows = []
    for r in table.itertuples(index=False):
        beats = "yes" if r.accuracy > r.majority else "no"
        rows.append(
            f"<tr><td>{esc(str(r.head))}</td><td>{esc(str(r.split))}</td><td>{r.n}</td>"
            f"<td><b>{percent(r.accuracy)}</b></td><td>{percent(r.majority)} ({esc(str(r.majority_class))})</td>"
            f"<td>{percent(r.chance)}</td><td>{percent(r.balanced_accuracy)}</td><td>{percent(r.top3)}</td>"
            f"<td>{beats}</td></tr>")
    wall = training_wall_html(report)
    return (
        "<h2>Headline numbers</h2>\n"
        "<p>Test accuracy per head on held-out utterances of training speakers (seen_test) and on "
        "speakers never trained on (unseen_test), beside the majority baseline (the most frequent "
        "training class, named) and chance.</p>\n"
        "<table><tr><th>head</th><th>test set</th><th>n</th><th>accuracy</th><th>majority baseline</th>"
        "<th>chance</th><th>balanced accuracy</th><th>top-3</th><th>beats majority</th></tr>\n"
        + "\n".join(rows) + "</table>\n" + wall
    )


def pooled_headline_html(report: Report) -> str:
    """The headline of a pooled folder: seen over seeds, unseen pooled over folds with its interval."""
    from voxlib.pooled import pooled_table

    esc = html.escape
    try:
        pooled = runfolder.load_pooled(report.run_dir)
    except Exception as err:  # unfinished: the notebook errors above say why
        return f"<h2>Headline numbers</h2><p class='error'>cannot read the pooled results: {esc(str(err))}</p>"
    config = pooled.experiment["config"]

    def pct(value) -> str:
        return "" if value is None or value != value else percent(value)

    rows = []
    for r in pooled_table(pooled.summary).itertuples(index=False):
        spread = f" ± {pct(r.seen_std_over_seeds)}" if r.seen_std_over_seeds is not None and \
            r.seen_std_over_seeds == r.seen_std_over_seeds else ""
        unseen = (f"<b>{pct(r.unseen)}</b> [{pct(r.unseen_low)}, {pct(r.unseen_high)}]"
                  if r.unseen_low is not None and r.unseen_low == r.unseen_low else "")
        speakers = "" if r.unseen_speakers is None or r.unseen_speakers != r.unseen_speakers else int(r.unseen_speakers)
        rows.append(f"<tr><td>{esc(str(r.head))}</td><td class='num'><b>{pct(r.seen)}</b>{spread}</td>"
                    f"<td class='num'>{pct(r.seen_majority)}</td><td class='num'>{unseen}</td>"
                    f"<td class='num'>{pct(r.fold_std)}</td><td class='num'>{pct(r.unseen_majority)}</td>"
                    f"<td class='num'>{speakers}</td><td class='num'>{pct(r.chance)}</td></tr>")
    wall = training_wall_html(report)
    return (
        "<h2>Headline numbers</h2>\n"
        f"<p>Pooled over {config['folds']} speaker fold(s) x {config['seeds']} training seed(s) "
        f"({len(pooled.members)} trainings). Unseen speakers: accuracy over every fold, each eligible speaker "
        "unseen exactly once, with a 95 % interval resampled over speakers and the spread (standard deviation) of "
        "the per-fold accuracies. Seen speakers (held-out utterances of training speakers): mean over seeds "
        "± its standard deviation. Majority: each run's most frequent training class, pooled the same way.</p>\n"
        "<table><tr><th>head</th><th>seen</th><th>seen majority</th><th>unseen, pooled [95 % interval]</th>"
        "<th>per-fold spread</th><th>unseen majority</th><th>unseen speakers</th><th>chance</th></tr>\n"
        + "\n".join(rows) + "</table>\n" + wall
    )


ALWAYS_SHOWN = ("width", "epochs", "batch_size", "lr", "optimizer", "precision", "device")  # even at their defaults
RECORD_KEYS = ("voxlib_version", "git_commit")  # config.json's record beside the settings


def effective_settings(run_dir: Path) -> list[tuple[str, str, str, str]] | None:
    """(setting, value used, default, meaning) for every field that differs from its default plus the
    ALWAYS_SHOWN ones, read from the run's own record (config.json, summary.json), not the command line.

    ``device`` and ``precision`` are what summary.json says the run used where it says so ("auto" is not
    a setting a reader can check). None before the run folder has a config.json.
    """
    members = _members(run_dir)
    path = members[0] / "config.json" if members else Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if members:  # the experiment's own settings (folds, seeds, seed, its folder), not those of its first member
        experiment = runfolder.read_json(Path(run_dir) / runfolder.EXPERIMENT)["config"]
        record |= {k: experiment[k] for k in ("folds", "fold", "seeds", "seed") if k in experiment}
        record["run_dir"] = str(run_dir)
    summary_path = path.parent / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    rows = []
    for f in field_info():
        if f.name not in record:
            continue
        value = record[f.name]
        used = summary.get(f.name) if f.name in ("device", "precision") else None
        if value == f.default and f.name not in ALWAYS_SHOWN and used is None:
            continue
        shown = f"{used} ({value})" if used not in (None, value) else value
        rows.append((f.name, _plain_value(shown), _plain_value(f.default), f.metadata["help"]))
    rows += [(key, _plain_value(record[key]), "", "the code that trained this run") for key in RECORD_KEYS
             if record.get(key)]
    return rows


def _plain_value(value: Any) -> str:
    return '""' if value == "" else f"{value:g}" if isinstance(value, float) else str(value)


def settings_html(run_dir: Path, values: dict[str, Any]) -> str:
    esc = html.escape
    rows = effective_settings(run_dir)
    if rows is None:
        given = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in sorted(values.items()))
        return ("<h2>Settings</h2><p>The run folder has no config.json yet; the parameters given were:</p>"
                f"<table>{given}</table>")
    def value(v: str, d: str) -> str:
        return f"<b>{esc(v)}</b>" if d and v != d else esc(v)

    body = "".join(f"<tr><td>{esc(n)}</td><td>{value(v, d)}</td><td>{esc(d)}</td><td class='note'>{esc(h)}</td></tr>"
                   for n, v, d, h in rows)
    return ("<h2>Settings of this run</h2>\n<p>From the run's config.json and summary.json: every setting that "
            "differs from its default (in bold), and the main training settings even at their defaults.</p>\n"
            "<table class='settings'><colgroup><col style='width: 22%'><col style='width: 36%'>"
            "<col style='width: 12%'><col style='width: 30%'></colgroup>"
            f"<tr><th>setting</th><th>value</th><th>default</th><th>meaning</th></tr>{body}</table>")


VERDICT_TITLE = "### Verdict"
_MARKDOWN_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+!|~$-])")


def verdict_lines(executed: Path) -> list[str] | None:
    """The verdict sentences as notebook 03 printed them (already HTML-escaped), or None.

    Read from the executed notebook rather than recomputed, so the index says exactly what the
    report page says.
    """
    import nbformat

    if not Path(executed).is_file():
        return None
    nb = nbformat.read(executed, as_version=4)
    for cell in reversed(nb.cells):
        for output in cell.get("outputs", []):
            text = output.get("data", {}).get("text/markdown", "")
            if text.startswith(VERDICT_TITLE):
                items = [ln[2:] for ln in text.splitlines() if ln.startswith("- ")]
                return [_MARKDOWN_ESCAPE.sub(r"\1", item) for item in items]
    return None


def verdict_html(report: Report) -> str:
    stage = next((s for s in report.stages if s.name == "03_birthplace"), None)
    lines = verdict_lines(stage.executed) if stage is not None else None
    if not lines:
        return ""
    items = "".join(f"<li>{line}</li>" for line in lines)  # escaped by the notebook (escape_markdown)
    return (f"<h2>Verdict: why is the birthplace head weak?</h2>\n<ul>{items}</ul>\n"
            f"<p class='note'>From <a href='{html.escape(stage.html.name)}'>03_birthplace</a>, where each "
            "explanation is tested.</p>")


# --- command line ----------------------------------------------------------------------------------
def _add_parameter_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="any Config field in papermill's spelling (-p epochs 2 = --epochs 2); repeatable")


def main(argv: Sequence[str] | None = None) -> int:
    from voxlib.cli import EXIT_FAILED, EXIT_OK, make_parser, parse
    from voxlib.evaluate import training_summary

    parser = make_parser("python -m voxlib.report", __doc__.split("\n\n")[0], extra=_add_parameter_flag)
    args, _ = parse(parser, argv)
    names = {f.name for f in field_info()}
    params = {k: v for k, v in vars(args).items() if k in names and v is not None}
    params.update({name: parse_value(name, value) for name, value in args.parameter})
    report = run_report(params=params)
    if not report.ok:
        print(f"error: {report.stages[-1].error}", file=sys.stderr)
    if report.ok and ((report.run_dir / "predictions.csv").is_file() or runfolder.is_pooled(report.run_dir)):
        print(training_summary(report.run_dir))  # ends with the report's path
    else:
        print(f"reports: {report.index}")
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    from voxlib.cli import run_command

    sys.exit(run_command(main))
