"""The page ``make demo`` prints: reports/index.html of a run or pooled folder.

It leads with what the run found (notebook 03's headline table: the discriminator beside the
reference baselines on the same folds, published in the executed notebook), then the verdict as
notebook 03 printed it, what makes birthplace hold on new voices when a remedies study is given, the
three reports (each without and with its code) and the settings the run used, read from the run's own
record. Everything corpus-made is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd

from voxlib import runfolder
from voxlib.baselines import REPRESENTATIONS
from voxlib.config import field_info
from voxlib.evaluate import accuracy_table
from voxlib.notebook import HEADLINE_MIME
from voxlib.pooled import pooled_table
from voxlib.text import percent
from voxlib.verdict import study_display, study_findings

NOTEBOOKS = ("01_explore", "02_train", "03_birthplace")
CODE_SUFFIX = "-code"  # reports/NAME-code.html: the report with its code cells


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


# --- index.html ------------------------------------------------------------------------------------
HEADLINE_SPLITS = ("seen_test", "unseen_test")


def headline(run_dir: Path) -> "pd.DataFrame | None":
    """Per head and test set: accuracy beside chance and the majority baseline; None without a run."""
    if not (Path(run_dir) / "predictions.csv").exists():
        return None
    return accuracy_table(runfolder.load_run(run_dir), splits=HEADLINE_SPLITS)


def training_seconds(run_dir: Path) -> float | None:
    """Wall time the trainer logged (sum of the per-epoch ``seconds`` rows of metrics.csv; of every
    member's for a pooled folder)."""
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
{study_html(values.get("study_dir"))}
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


def study_html(study_dir: str | None) -> str:
    """What makes birthplace hold on new voices: the remedies study's findings, table and figure."""
    if not study_dir:
        return ""
    esc = html.escape
    try:
        study = runfolder.load_study(study_dir)
    except runfolder.RunError as err:
        return f"<h2>What makes birthplace hold on new voices</h2><p class='error'>{esc(str(err))}</p>"
    table = study_display(study.table)

    def cell(column: str, value) -> str:
        if value is None or value != value:
            return "<td></td>"
        return f"<td class='num'>{percent(value) if column != 'training minutes' else f'{value:.1f}'}</td>"

    rows = "".join(f"<tr><td>{esc(str(name))}</td>" + "".join(cell(c, v) for c, v in row.items()) + "</tr>"
                   for name, row in table.iterrows())
    header = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    figure = study.path / runfolder.STUDY_PNG
    image = (f"<p><img alt='unseen-speaker birthplace accuracy per variant' style='max-width: 100%' "
             f"src='data:image/png;base64,{base64.b64encode(figure.read_bytes()).decode()}'></p>"
             if figure.is_file() else "")
    items = "".join(f"<li>{esc(line)}</li>" for line in study_findings(study.table))
    return ("<h2>What makes birthplace hold on new voices</h2>\n"
            f"<p>The remedies study in <code>{esc(str(study.path))}</code>: the seed discriminator, each remedy alone "
            f"and preset accent, trained on the same {study.record['folds']} speaker folds, beside the reference "
            "baselines fitted on those folds. Unseen speakers: pooled over the folds, low and high bound the 95 % "
            "interval resampled over speakers.</p>\n"
            f"<ul>{items}</ul>\n<table><tr><th>variant</th>{header}</tr>{rows}</table>\n{image}")


def published_headline(executed: Path) -> "pd.DataFrame | None":
    """The headline table notebook 03 published (notebook.publish_headline), or None."""
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
    return (f"<h2>Verdict: what the birthplace head learned</h2>\n<ul>{items}</ul>\n"
            f"<p class='note'>From <a href='{html.escape(stage.html.name)}'>03_birthplace</a>, where each "
            "explanation is tested.</p>")


