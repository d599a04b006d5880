"""Test-only: in the demo corpus' render helper, pause each espeak-ng worker (see tests/signal_runner.py)."""
import os

if os.environ.get("VOX_SIGNAL_TEST_MARKER"):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import signal_runner
    import voxlib.demo as demo

    demo.render_speaker = signal_runner.pausing(demo.render_speaker, os.environ["VOX_SIGNAL_TEST_MARKER"])
