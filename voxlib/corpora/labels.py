"""Label checks that must pass before a corpus is trained on.

A speaker has one birthplace and one sex. When the rows of a speaker disagree, the model is taught two
answers for one voice and the unseen-speaker split can put the same person on both sides of a class;
so a disagreement stops the run, naming the speaker and its values with their row counts, unless
``label_conflicts="majority"`` asks to give each such speaker its majority value (a tie still stops),
which is then reported.

Class names that differ only in spelling form are a second trap ('Glasgow' and 'glasgow' train as two
classes). The rule:

- names identical after Unicode NFC normalisation and stripping are the same name and are merged to
  the NFC form silently: the difference is invisible on screen and no annotator meant it;
- names that differ only by case, inner whitespace or compatibility forms (full-width letters, NFKC)
  are reported as a notice listing the groups with their row counts, and are *not* merged: 'US' and
  'us' may be distinct codes, and renaming a class is the corpus owner's decision.

The functions work on a manifest table (or a run's splits.csv table): columns ``speaker`` and the
label columns, and ``row`` for messages when present.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import pandas as pd

__all__ = ["LabelCheck", "check_labels", "spelling_variants", "speaker_conflicts", "too_few_speakers",
           "too_few_speakers_notice"]

MAX_ROWS_SHOWN = 5  # row numbers listed per minority value in a conflict message


@dataclass
class LabelCheck:
    """The outcome of :func:`check_labels`: the (possibly resolved) table, problems and notices."""

    table: pd.DataFrame
    problems: list[str] = field(default_factory=list)  # each stops the run; one line per speaker and label
    notices: list[str] = field(default_factory=list)  # accepted, but worth knowing


def check_labels(table: pd.DataFrame, label_columns: list[str], speaker_labels: list[str],
                 label_conflicts: str = "stop") -> LabelCheck:
    """Normalise, compare and (optionally) resolve the labels of ``table``.

    ``label_columns``: the label columns present (speaker, birthplace, sex, extras);
    ``speaker_labels``: those that must be constant per speaker (a name the table lacks is a problem,
    except ``birthplace``, which a corpus may simply not have). Rows with an empty value are left out
    of the per-speaker comparison for ``birthplace`` and ``sex`` (an empty one is reported per row
    elsewhere); for an extra column '' is a class like any other.
    """
    if label_conflicts not in ("stop", "majority"):
        raise ValueError(f"label_conflicts must be 'stop' or 'majority', got {label_conflicts!r}")
    table = table.copy()
    problems: list[str] = []
    for name in speaker_labels:
        if name == "speaker" or (name not in label_columns and name != "birthplace"):
            what = "is the speaker itself" if name == "speaker" else "is not a label column of the manifest"
            problems.append(f"speaker_labels names {name!r}, which {what} (label columns: {', '.join(label_columns)})")
    checked = [n for n in speaker_labels if n in label_columns and n != "speaker"]
    if table.empty:  # every row already rejected: nothing to compare
        return LabelCheck(table.reindex(columns=label_columns), problems)
    for column in label_columns:
        table[column] = table[column].astype(str).map(lambda v: unicodedata.normalize("NFC", v).strip())
    notices = [line for column in label_columns for line in _variant_lines(table, column)]
    for column in checked:
        lines, changes = speaker_conflicts(table, column, resolve=label_conflicts == "majority")
        problems += lines
        for speaker, value, rows in changes:
            table.loc[rows, column] = value
            notices.append(f"speaker {speaker!r}: {column} set to its majority value {value!r} on {len(rows)} "
                           f"row(s) (label_conflicts=majority)")
    return LabelCheck(table, problems, notices)


def speaker_conflicts(table: pd.DataFrame, column: str, resolve: bool = False
                      ) -> tuple[list[str], list[tuple[str, str, pd.Index]]]:
    """Speakers whose rows disagree on ``column``: problem lines and, with ``resolve``, the changes.

    A change is ``(speaker, majority value, index of the rows to set)``; a speaker whose top values tie
    stays a problem even with ``resolve`` (no value is more right than the other).
    """
    values = table[column].astype(str)
    if column in ("birthplace", "sex"):
        values = values[values != ""]
    counts = values.groupby(table.loc[values.index, "speaker"]).value_counts()
    problems, changes = [], []
    for speaker, per_value in counts.groupby(level=0, sort=True):
        if len(per_value) < 2:
            continue
        per_value = per_value.droplevel(0).sort_values(ascending=False, kind="stable")
        tie = per_value.iloc[0] == per_value.iloc[1]
        if resolve and not tie:
            majority = per_value.index[0]
            rows = values.index[(table.loc[values.index, "speaker"] == speaker) & (values != majority)]
            changes.append((speaker, majority, rows))
            continue
        listed = ", ".join(f"{v!r} ({n} row{'s' if n != 1 else ''}{_rows_hint(table, values, speaker, v, i)})"
                           for i, (v, n) in enumerate(per_value.items()))
        fix = ("the top values tie, so no majority can be taken; fix the manifest" if resolve else
               "fix the manifest, or set label_conflicts=majority to take each speaker's majority value")
        problems.append(f"speaker {speaker!r} has {len(per_value)} {column} values: {listed}; {fix}")
    return problems, changes


def _rows_hint(table: pd.DataFrame, values: pd.Series, speaker: str, value: str, rank: int) -> str:
    """Row numbers of a minority value (the majority's rows are not worth listing)."""
    if rank == 0 or "row" not in table.columns:
        return ""
    rows = table.loc[values.index[(table.loc[values.index, "speaker"] == speaker) & (values == value)], "row"]
    shown = ", ".join(str(r) for r in rows.head(MAX_ROWS_SHOWN))
    return f": row{'s' if len(rows) != 1 else ''} {shown}{' ...' if len(rows) > MAX_ROWS_SHOWN else ''}"


def _spelling_key(name: str) -> str:
    """What is left of a class name once case, whitespace and compatibility forms are ignored."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def spelling_variants(table: pd.DataFrame, column: str) -> list[list[tuple[str, int]]]:
    """Groups of distinct class names of ``column`` that differ only by case, whitespace or NFKC form.

    Each group lists ``(name, rows)``, most frequent first; names are compared as stored (NFC).
    """
    counts = table[column].astype(str).value_counts()
    counts = counts[counts.index != ""]
    groups = counts.groupby(counts.index.map(_spelling_key), sort=True)
    return [sorted(g.items(), key=lambda nv: (-nv[1], nv[0])) for _, g in groups if len(g) > 1]


def _variant_lines(table: pd.DataFrame, column: str) -> list[str]:
    lines = []
    for group in spelling_variants(table, column):
        names = " and ".join(f"{name!r} ({n} row{'s' if n != 1 else ''})" for name, n in group)
        lines.append(f"{column}: {names} differ only by case, whitespace or character width; they are kept "
                     "as separate classes (rename them in the manifest if they are one)")
    return lines


def too_few_speakers(table: pd.DataFrame, column: str, min_speakers: int) -> pd.DataFrame:
    """Classes of ``column`` with fewer than ``min_speakers`` speakers: no unseen-speaker evaluation.

    The split holds out whole speakers only from classes with at least ``unseen_min_speakers`` of them,
    so such a class is never scored on new voices. Columns ``class, speakers``, smallest first.
    """
    if column not in table.columns:
        return pd.DataFrame(columns=["class", "speakers"])
    per_class = table.groupby(table[column].astype(str))["speaker"].nunique()
    small = per_class[per_class < min_speakers].sort_values(kind="stable")
    return pd.DataFrame({"class": small.index.astype(str), "speakers": small.to_numpy(int)})


def too_few_speakers_notice(table: pd.DataFrame, column: str, min_speakers: int) -> str | None:
    """One sentence naming the classes without unseen-speaker evaluation, or None when there are none."""
    small = too_few_speakers(table, column, min_speakers)
    if small.empty:
        return None
    named = ", ".join(f"{c!r} ({n})" for c, n in zip(small["class"], small["speakers"]))
    return (f"{len(small)} {column} class(es) have fewer than {min_speakers} speakers (unseen_min_speakers) and "
            f"get no unseen-speaker evaluation: {named}")
