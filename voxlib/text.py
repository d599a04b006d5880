"""Corpus text on its way to an output: one function per medium, so each medium has one owner.

Labels and file names come from the corpus and may hold anything: HTML, Markdown, TeX math,
carriage returns and other control characters, quotes, commas, right-to-left text, emoji. Each
output gets the text unchanged in meaning and harmless in effect:

- CSV: runfolder's quoted writes read back byte for byte (nothing to do here).
- HTML: ``html_text`` (``html.escape``); tables through ``plots.styled``.
- Markdown cells: ``markdown`` (Markdown specials backslashed, then HTML-escaped).
- matplotlib: ``plot_label`` / ``plot_table``; mathtext treats text between two ``$`` as TeX (a
  label ``$\\frac$`` raised an exception), so ``$`` is escaped and drawn as itself.
- TensorBoard tags: ``tag`` (one line; ``/`` would add a level to the tag hierarchy).
- Logs and one-line errors: ``one_line``: control characters shown escaped (``\\r``, ``\\x1b``), so a
  file name cannot break a line, move the cursor or colour the terminal; other Unicode is kept.
"""
from __future__ import annotations

import html
import math
import re
import unicodedata
from typing import Any

import pandas as pd

PERCENT = "{:.1%}"  # every share a person reads (tables, figures, verdicts): percent, one decimal


def percent(share: float) -> str:
    """A share (0.256) as vox shows it everywhere: ``25.6%``."""
    return PERCENT.format(share)


def points(difference: float) -> str:
    """A difference of two shares (0.039) as a reader says it: ``3.9 percentage points``."""
    return f"{100 * difference:.1f} percentage points"


def number(value: float) -> str:
    """Any other number a person reads (a loss, a slope, a median level): never scientific notation.

    Whole numbers as integers with thousands separators (``1,920``); otherwise about three significant
    digits in fixed notation (``7,813``, ``-42.3``, ``1.23``, ``-0.023``, ``0.00012``). NaN is shown as
    an empty string.
    """
    if value != value:  # NaN
        return ""
    if float(value).is_integer():
        return f"{int(value):,}"
    size = abs(value)
    decimals = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3 if size >= 0.001 else \
        1 - math.floor(math.log10(size))
    return f"{value:,.{decimals}f}"


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+!|~$-])")  # <, >, & are left to html.escape
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}


def one_line(text: object) -> str:
    """``text`` with every control character (Unicode category Cc, and line/paragraph separators)
    written as an escape, the way ``repr`` writes it; printable text, any script, unchanged."""
    return "".join(_escaped(c) for c in str(text))


def _escaped(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def html_text(text: object) -> str:
    """Text for an HTML page: markup characters and quotes escaped."""
    return html.escape(str(text), quote=True)


def markdown(text: object) -> str:
    """A corpus label made safe to paste into Markdown: no HTML, no accidental formatting, one line."""
    return html.escape(_MARKDOWN_SPECIALS.sub(r"\\\1", one_line(text)), quote=True)


def markdown_table(table: Any) -> str:
    """A DataFrame of already formatted cells as a Markdown table ('|' in a cell escaped, one line each)."""
    def cell(value: object) -> str:
        return one_line(value).replace("|", "\\|")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    return header + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in table.itertuples(index=False))


def plot_label(text: object) -> str:
    """Text matplotlib draws as written: ``$`` escaped so mathtext never starts."""
    return one_line(text).replace("$", r"\$")


def plot_table(table: Any) -> Any:
    """A copy of a DataFrame whose text cells, index and column names are ``plot_label``-ed (numbers
    untouched), for seaborn, which turns them into tick labels and legends."""
    out = table.copy()
    for column in out.columns:
        if out[column].dtype == object or isinstance(out[column].dtype, (pd.CategoricalDtype, pd.StringDtype)):
            out[column] = out[column].map(lambda v: plot_label(v) if isinstance(v, str) else v)
    out.index = _labels(out.index)
    out.columns = _labels(out.columns)
    return out


def _labels(index: Any) -> Any:
    if isinstance(index, pd.MultiIndex) or not (index.dtype == object or isinstance(index.dtype, pd.StringDtype)):
        return index
    return pd.Index([plot_label(v) if isinstance(v, str) else v for v in index], name=index.name)


def tag(text: object) -> str:
    """A TensorBoard tag part: one line, and ``/`` (the tag hierarchy's separator) as ``∕``."""
    return one_line(text).replace("/", "\u2215")
