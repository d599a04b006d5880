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
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import jinja2
import nbformat
import papermill as pm
from nbconvert import HTMLExporter
from papermill.exceptions import PapermillExecutionError, strip_color

from voxlib import runfolder
from voxlib.cli import EXIT_FAILED, EXIT_OK, make_parser, parse, run_command
from voxlib.config import Config, ConfigError, field_info
from voxlib.corpora.source import default_run_dir
from voxlib.evaluate import training_summary
from voxlib.index_page import CODE_SUFFIX, NOTEBOOKS, Report, Stage, write_index
from voxlib.notebook import PATH_FIELDS
from voxlib.progress import PROGRESS_FILE_ENV, TrainingProgress, follow
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding voxlib/


class _EveryFieldIsAParameter(logging.Filter):
    """Papermill warns about names missing from a notebook's parameters cell; in vox every Config
    field is a parameter of every notebook (Config.from_namespace checks them), so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


logging.getLogger("papermill").addFilter(_EveryFieldIsAParameter())
KERNEL_NAME = "python3"
TQDM_MININTERVAL_S = "15"  # progress bars inside notebooks: few updates, so stored outputs stay small


class ReportError(RuntimeError):
    """A notebook failed; the message names the notebook and the cell."""


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
    for name in ("compare_run_dir", "study_dir"):
        if values.get(name) and not Path(values[name]).is_dir():
            raise ConfigError(f"parameter '{name}': no such folder {values[name]}")
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


# --- command line ----------------------------------------------------------------------------------
def _add_parameter_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="any Config field in papermill's spelling (-p epochs 2 = --epochs 2); repeatable")


def main(argv: Sequence[str] | None = None) -> int:
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
    sys.exit(run_command(main))
