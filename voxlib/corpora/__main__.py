"""Turn a corpus, as distributed, into a vox manifest.

    python -m voxlib.corpora NAME ROOT [-o OUT/manifest.csv] [options]
    python -m voxlib.corpora vctk ~/data/VCTK-Corpus-0.92 --min-utterances 20
    python -m voxlib.corpora NAME --help          # that adapter's options

NAME is one of csj, vctk, accent_archive, common_voice, jvs (docs/corpora.md: the layout each expects).
Without -o the manifest is ROOT/vox_manifest.csv. Written outside ROOT, its relative paths climb out of
its folder ('../'), so train it with --allow-outside-paths (notebooks: -p allow_outside_paths True).
Prints a summary; every dropped row is listed with its reason in rejected.csv beside the manifest.
Exit status: 0 written, 1 written but empty, 2 the corpus could not be read, 130 interrupted.
Errors are one line; --debug (or VOX_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import argparse
import sys

from voxlib.cli import DEBUG_ENV, VoxParser, run_command

from .common import ADAPTER_MODULES, adapter_module, add_common_arguments


def parser() -> argparse.ArgumentParser:
    intro, usage = __doc__.split("\n\n", 1)
    main = VoxParser(prog="python -m voxlib.corpora", description=intro, epilog=usage,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    names = main.add_subparsers(dest="name", required=True, metavar="NAME", help=", ".join(ADAPTER_MODULES))
    for name in ADAPTER_MODULES:
        module = adapter_module(name)
        sub = names.add_parser(name, help=module.__doc__.split("\n")[0], description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("root", metavar="ROOT", help="the corpus folder, as distributed")
        sub.add_argument("-o", "--out", default=None, metavar="MANIFEST",
                         help="manifest to write (default ROOT/vox_manifest.csv)")
        module.add_arguments(sub.add_argument_group(f"{name} options"))
        add_common_arguments(sub)
        sub.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or {DEBUG_ENV}=1)")
    return main


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    name, root, out, debug = args.pop("name"), args.pop("root"), args.pop("out"), args.pop("debug")
    try:
        summary = adapter_module(name).build_manifest(root, out, **args)
    except ValueError as err:  # CorpusError, or an impossible option value
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.utterances else 1


if __name__ == "__main__":
    sys.exit(run_command(main))
