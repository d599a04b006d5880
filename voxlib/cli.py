"""The command line of every vox command: flags generated from the Config fields, one-line errors.

One list of knobs: each ``Config`` field is the flag ``--field-name`` in every command that takes it,
with the field's help text, default, allowed values and range in ``--help``, grouped as in
config.py. So ``--seed`` is the training seed wherever it appears and ``--demo-seed`` the demo
corpus's, never one for the other.

Every command's ``__main__`` is ``sys.exit(run_command(main, argv))``: a user error (a bad
parameter, a broken manifest, a run folder that cannot be resumed, a missing file, Ctrl-C) ends with
one ``error: ...`` message on stderr and a documented exit status instead of a traceback.
``--debug`` or ``VOX_DEBUG=1`` re-raises it with the traceback.

Exit status: 0 done; 1 the data, a file or the run stopped it; 2 a usage or parameter error;
130 interrupted (Ctrl-C); 143 terminated (SIGTERM). Interrupted training resumes from its last
checkpoint when the same command is run again.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import logging
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path, PurePath
from typing import Any, Callable, Sequence

from voxlib.config import GROUPS, PRESETS, Config, ConfigError, _field_type, field_info
from voxlib.signals import Terminated
from voxlib.text import one_line

METAVARS = {str: "TEXT", int: "INT", float: "NUMBER"}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
DEBUG_ENV = "VOX_DEBUG"
MESSAGE_LINES = 12  # a problem list (ManifestError) prints this many of its lines, then a count

# Errors that describe the user's data, files or settings, by class name so that this module does not
# import torch (train), pandas (evaluate) or the corpus readers to recognise them.
USAGE_ERRORS = ("ConfigError",)
RUN_ERRORS = ("ManifestError", "RunError", "CheckpointError", "TrainingError", "CorpusError", "DemoCorpusError",
              "ReportError", "AudioError", "LockedError", "ProbeUnavailable", "FolderError", "PredictError",
              "WriteError", "FeatureCacheError", "ValueError")
PATH_ERRORS = {"FileNotFoundError": "no such file or folder", "PermissionError": "permission denied",
               "IsADirectoryError": "is a folder, not a file", "NotADirectoryError": "not a folder",
               "FileExistsError": "already exists"}

# torch re-raises an error from a DataLoader worker as its own class (or RuntimeError) with this
# message and the worker's traceback; the user's sentence is the traceback's last entry
_WORKER_ERROR = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.")


# --- parser --------------------------------------------------------------------------------------
class VoxParser(argparse.ArgumentParser):
    """argparse without prefix guessing (``--lr`` never silently means ``--lr-schedule``); an unknown
    flag is answered with the nearest known one and a one-line error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse's hook: print and exit 2
        unknown = message.partition("unrecognized arguments: ")[2].split()
        flags = [a for a in unknown if a.startswith("-")]
        if flags:  # the values after an unknown flag are unrecognised too; the flag is what to fix
            hints = [_did_you_mean(flag, self.known_flags()) for flag in flags]
            message = f"unknown flag{'s' if len(flags) > 1 else ''} " + ", ".join(hints)
        elif unknown:
            message = "unexpected argument(s) " + " ".join(unknown)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


    def known_flags(self) -> list[str]:
        """This parser's flags and its sub-commands' (their unknown flags come back to the top parser)."""
        known = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    known += sub.known_flags() if isinstance(sub, VoxParser) else list(sub._option_string_actions)
        return sorted(set(known))


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Room for long flag names; the description keeps its own line breaks (usage examples)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=_terminal_width() - 2)


def _terminal_width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


def _did_you_mean(flag: str, known: list[str]) -> str:
    close = difflib.get_close_matches(flag.split("=", 1)[0], [k for k in known if k.startswith("--")], n=1,
                                      cutoff=0.6)
    return f"{flag} (did you mean {close[0]}?)" if close else flag


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def field_help(f: Any) -> str:
    """The field's help text, its default, and its allowed values or range, as one --help entry."""
    meta, parts = f.metadata, [f.metadata["help"]]
    parts.append(f"default: {_number(f.default)}")
    low, high = meta["low"], meta["high"]  # choices are in the flag's metavar
    if low is not None and high is not None:
        parts.append(f"range: {_number(low)}..{_number(high)}")
    elif low is not None:
        parts.append(f"at least {_number(low)}")
    return "; ".join(parts).replace("%", "%%")


def _number(value: Any) -> str:
    """How --help and the reports show a value: 1e-05, 0.25, 1000000, "" for an empty text."""
    return '""' if value == "" else f"{value:g}" if isinstance(value, float) else str(value)


def add_config_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One ``--flag`` per Config field (``batch_size`` -> ``--batch-size``), grouped like config.py.

    A flag left out stays None in the namespace, so ``config_from_args`` can tell "not given" from
    "given the default value" (``--config`` replays a run, and only the flags given change it).
    """
    chosen = [f for f in field_info() if only is None or f.name in only]
    if only is not None:
        missing = sorted(set(only) - {f.name for f in chosen})
        assert not missing, f"not Config fields: {missing}"
    sections = {g: parser.add_argument_group(f"{g} (Config fields)") for g in GROUPS
                if any(f.metadata["group"] == g for f in chosen)}
    for f in chosen:
        meta, want = f.metadata, _field_type(f)
        group = sections[meta["group"]]
        if want is bool:
            group.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=field_help(f))
        else:
            metavar = ("{" + ",".join('""' if c == "" else str(c) for c in meta["choices"]) + "}" if meta["choices"]
                       else METAVARS[want])
            group.add_argument(flag_name(f.name), dest=f.name, type=_typed(f.name, want), default=None,
                               choices=meta["choices"], metavar=metavar, help=field_help(f))


def _typed(name: str, want: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return want(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want.__name__}, got {text!r}") from None

    convert.__name__ = want.__name__  # argparse names the type in its message
    return convert


def make_parser(prog: str, description: str = "", config_fields: bool | Sequence[str] = True,
                extra: Callable[[argparse.ArgumentParser], None] | None = None, replay: bool = False,
                epilog: str = "") -> VoxParser:
    """The parser of one vox command.

    ``config_fields``: True for every Config field, a list of field names for some, False for none.
    ``extra(parser)`` adds the command's own arguments (positionals, ``--out``) before the fields.
    ``replay`` adds ``--config RUN/config.json`` (start from a recorded run; flags given still win).
    Every command gets ``--outputs`` and ``--debug``.
    """
    parser = VoxParser(prog=prog, description=description, epilog=epilog or EPILOG,
                       usage=f"{prog} [options]" if config_fields is True else None)
    if extra is not None:
        extra(parser)
    common = parser.add_argument_group("every command")
    common.add_argument("--outputs", metavar="DIR", default=None,
                        help="root of everything vox writes by default (runs, caches, demo corpus); "
                             "default: $VOX_OUTPUTS, else outputs/ of the checkout holding voxlib, "
                             "else ./outputs")
    if replay:
        common.add_argument("--config", metavar="JSON", default=None,
                            help="start from these settings (a run's config.json); flags given still win")
    common.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    if config_fields:
        add_config_arguments(parser, None if config_fields is True else list(config_fields))
    return parser


EPILOG = ("exit status: 0 done; 1 the data, a file or the run stopped it; 2 usage or parameter error;\n"
          "130 interrupted, 143 terminated (re-run the same command to resume)")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """Parse, point ``$VOX_OUTPUTS`` at ``--outputs`` (so notebook kernels and workers see it too),
    and build the Config: ``--config``'s settings if given, then every flag given on top."""
    args = parser.parse_args(argv)
    if getattr(args, "outputs", None):
        os.environ["VOX_OUTPUTS"] = str(Path(args.outputs).expanduser().resolve())
    return args, config_from_args(args)


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config of the flags given (those left out keep their defaults, or ``--config``'s values)."""
    names = {f.name for f in field_info()}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    replayed = getattr(args, "config", None)
    cfg = Config.from_json(replayed).replace(**given) if replayed else Config.from_dict(given)
    refuse_undoing_the_preset(given, cfg.preset)
    return cfg


def refuse_undoing_the_preset(given: dict[str, Any], preset: str) -> None:
    """A flag given at its default cannot switch off what the preset sets (a preset fills only the
    fields left at their default, so it would silently win): say so instead."""
    defaults = {f.name: f.default for f in field_info()}
    undone = [name for name, value in given.items()
              if value == defaults[name] and name in PRESETS.get(preset, {}) and PRESETS[preset][name] != value]
    if undone:
        flags = ", ".join(f"{flag_name(n)} {_number(given[n])}" for n in undone)
        raise ConfigError(f"{flags}: preset {preset!r} sets {', '.join(undone)}; a value equal to the default cannot "
                          f"undo it. Use --preset \"\" and give the preset's other settings you want "
                          f"({', '.join(f'{k}={_number(v)}' for k, v in PRESETS[preset].items() if k not in undone)})")


def parse_config(argv: Sequence[str] | None = None, prog: str = "python -m voxlib.train",
                 description: str = "") -> Config:
    """The training command's flags: every Config field, ``--config`` to replay a run."""
    return parse(make_parser(prog, description, replay=True), argv)[1]


# --- errors --------------------------------------------------------------------------------------
def run_command(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main(argv)`` and return its exit status, user errors as one message.

    ``sys.exit(run_command(main))`` is a command's whole ``__main__``. ``main`` may return an int
    (its exit status) or anything else (0). An error that is not the user's (a bug) keeps its
    traceback; ``--debug`` or ``VOX_DEBUG=1`` keeps it for every error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    restore = _sigterm_raises()
    try:
        result = main(argv)
    except BaseException as err:  # noqa: BLE001 - sorted below; the rest is re-raised
        described = None if debug else describe_error(err)
        if described is None:
            raise
        status, text = described
        print(text, file=sys.stderr, flush=True)
        return status
    finally:
        restore()
    return result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK


def describe_error(err: BaseException) -> tuple[int, str] | None:
    """(exit status, message) for a user error; None for anything else (SystemExit, bugs).

    An error raised in a DataLoader worker is judged as the error it was in the worker: its own
    class decides the exit status and its own message is shown, not torch's wrapper.
    """
    unwrapped = worker_error(err)
    if unwrapped is not None:
        name, text = unwrapped
        original = _rebuilt(err, name, text)
        if original is not None:
            return describe_error(original)
        # a class torch could not rebuild (its constructor takes other arguments): judged by its name
        if name in USAGE_ERRORS:
            return EXIT_USAGE, f"error: {_message(text)}"
        if name in RUN_ERRORS:
            return EXIT_FAILED, f"error: {_message(text)}"
        return None
    names = [cls.__name__ for cls in type(err).__mro__]
    if isinstance(err, Terminated):
        return EXIT_TERMINATED, "error: interrupted (SIGTERM); re-run the same command to resume"
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "error: interrupted; re-run the same command to resume"
    if isinstance(err, OSError) and names[0] in PATH_ERRORS or (isinstance(err, OSError) and err.filename):
        what = PATH_ERRORS.get(names[0]) or (err.strerror or str(err)).lower()
        path = err.filename if err.filename is not None else ""
        return EXIT_FAILED, f"error: {what}: {path}" if path else f"error: {_message(err)}"
    if any(n in USAGE_ERRORS for n in names):
        return EXIT_USAGE, f"error: {_message(err)}"
    if names[0] in RUN_ERRORS or any(n in RUN_ERRORS[:-1] for n in names):
        return EXIT_FAILED, f"error: {_message(err)}"
    return None


def worker_error(err: BaseException) -> tuple[str, str] | None:
    """(class name, message) of the error a DataLoader worker raised, from torch's wrapper; else None."""
    text = str(err)
    found = _WORKER_ERROR.match(text)
    if not found:
        return None
    name = found.group(1)
    lines = text.split("\n")
    entry = re.compile(rf"^(?:[\w.]+\.)?{re.escape(name)}(?:: (.*))?$")
    for i in range(len(lines) - 1, 0, -1):
        last = entry.match(lines[i])
        if last:
            return name, "\n".join([last.group(1) or name, *lines[i + 1:]]).strip()
    return name, lines[0]


def _rebuilt(err: BaseException, name: str, text: str) -> BaseException | None:
    """The worker's error as it was raised there (its class, its message; errno and file of an OSError)."""
    cls = type(err)
    if cls.__name__ != name:
        return None
    if issubclass(cls, OSError):  # str(OSError) is "[Errno N] strerror: 'file'", the file name as its repr
        parts = re.match(r"\[Errno (\d+)\] (.*?)(?:: ('.*'|\".*\"))?$", text, re.S)
        if parts:
            try:
                filename = [ast.literal_eval(parts[3])] if parts[3] is not None else []
            except (ValueError, SyntaxError):
                filename = []
            return cls(int(parts[1]), parts[2], *filename)
    try:
        return cls(text)
    except Exception:  # noqa: BLE001 - a class that cannot be rebuilt is judged by its name
        return None


def _message(err: BaseException | str) -> str:
    """The error's own text: a problem list keeps its first lines and counts the rest."""
    # a message's own lines are kept; control characters inside one (a \r in a file name) are escaped
    lines = [one_line(line) for line in str(err).strip().split("\n")] or [type(err).__name__]
    if len(lines) <= MESSAGE_LINES + 1:
        return "\n".join(lines)
    rest = len(lines) - 1 - MESSAGE_LINES
    return "\n".join(lines[: MESSAGE_LINES + 1] + [f"({rest} more lines: re-run with --debug)"])


def _sigterm_raises() -> Callable[[], None]:
    """SIGTERM raises Terminated in the main thread while the command runs; returns the undo."""
    if os.name == "nt" or not _main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# --- progress lines ------------------------------------------------------------------------------
class OneLineFormatter(logging.Formatter):
    """Log lines with corpus text harmless: the message's arguments (file names, labels) on one line
    with control characters escaped (text.one_line); the message's own line breaks kept."""

    def formatMessage(self, record) -> str:
        return "\n".join(one_line(line) for line in super().formatMessage(record).split("\n"))

    def format(self, record) -> str:
        if isinstance(record.args, tuple) and record.args:
            shown = tuple(one_line(a) if isinstance(a, (str, PurePath)) else a for a in record.args)
            record = logging.makeLogRecord({**record.__dict__, "args": shown})
        return super().format(record)


def log_to(stream: Any = None, level: int = 20) -> None:
    """vox's log lines (one per epoch, resume and skip notices) as plain text on ``stream``.

    Notebooks call ``log_to(sys.stdout)``: stdout is the cell's ordinary output, where stderr would
    be a pink block in the HTML report. Calling it again replaces the handler (no doubled lines).
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(OneLineFormatter("%(message)s"))
    logger = logging.getLogger("voxlib")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
