"""``python -m voxlib.bench``: see voxlib/bench/__init__.py."""
import sys

from voxlib.bench.runner import main
from voxlib.cli import run_command

sys.exit(run_command(main))
