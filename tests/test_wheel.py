"""voxlib as a user installs it: a wheel built from this checkout, installed into a fresh venv, run from a
folder outside the checkout (inside an unrelated git repository), with no network.

The venv gets its third-party packages from the current environment through a .pth file that lists
this environment's site-packages. Python adds such a path but does not process the .pth files inside
it, so the checkout's editable install is not importable there: only the wheel's voxlib is.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent
TINY = ["-p", "width", "0.0625", "-p", "epochs", "2", "-p", "eval_crops", "1", "-p", "batch_size", "16"]


def _run(argv: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv[:4]} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def build_wheel(out: Path) -> Path:
    """The wheel of a copy of the checkout (a build writes build/ and *.egg-info beside its sources)."""
    source = out / "source"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CHECKOUT / name, source / name)
    for name in ("voxlib", "notebooks"):
        shutil.copytree(CHECKOUT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", out / "dist", source], cwd=out)
    (wheel,) = (out / "dist").glob("voxlib-*.whl")
    return wheel


def fresh_venv(root: Path, wheel: Path) -> Path:
    """A venv holding only the wheel's voxlib; everything else comes from this environment."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root], check=True, timeout=120)
    python = root / "bin" / "python"
    # pip of this environment installs into the venv; the .pth comes after, so pip never sees (and
    # never offers to uninstall) the editable voxlib of this environment
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=root)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip())
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_vox_test_deps.pth").write_text("".join(f"{p}\n" for p in here))
    # data files a real install of the dependencies would put in the venv: nbconvert's HTML templates
    (root / "share" / "jupyter").mkdir(parents=True)
    (root / "share" / "jupyter" / "nbconvert").symlink_to(Path(sys.prefix) / "share" / "jupyter" / "nbconvert")
    _run([python, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], cwd=root)
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    python = fresh_venv(root / "venv", build_wheel(root))
    return root, python


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VOX_OUTPUTS", "VIRTUAL_ENV")}
    return {**env, **extra}


def test_the_wheel_carries_voxlib_and_its_notebooks_and_the_venv_imports_it(installed):
    root, python = installed
    where = _run([python, "-c", "import voxlib, voxlib.report as r; print(voxlib.__file__); print(r.find_notebooks())"],
                 cwd=root, env=_clean_env()).split()
    venv = (root / "venv").resolve()
    assert Path(where[0]).resolve().is_relative_to(venv), where
    assert Path(where[1]).resolve() == venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages" / "voxlib" / "notebooks"
    spec = _run([python, "-c", "from jupyter_client.kernelspec import KernelSpecManager as M; "
                 "print(M().find_kernel_specs()['python3'])"], cwd=root, env=_clean_env())
    assert Path(spec.strip()).resolve().is_relative_to(venv)


def test_report_runs_from_a_foreign_folder_and_writes_only_under_outputs(installed, tiny_corpus):
    """python -m voxlib.report from inside an unrelated git repository: all three notebooks run on the
    wheel's copies, every artefact lands under --outputs, and config.json records no git commit."""
    root, python = installed
    elsewhere = root / "someone_elses_project"
    elsewhere.mkdir()
    if shutil.which("git"):
        _run(["git", "init", "-q"], cwd=elsewhere)
        _run(["git", "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q", "--allow-empty", "-m", "x"],
             cwd=elsewhere)
    outputs = root / "vox_outputs"
    _run([python, "-m", "voxlib.report", "--manifest", tiny_corpus, "--outputs", outputs, *TINY], cwd=elsewhere,
         env=_clean_env(), timeout=600)
    run = outputs / "runs" / tiny_corpus.parent.name
    for page in ("index", "01_explore", "02_train", "03_birthplace"):
        assert (run / "reports" / f"{page}.html").stat().st_size > 1000, page
    assert "verdict" in (run / "reports" / "index.html").read_text().lower()
    record = json.loads((run / "config.json").read_text())
    assert not record["git_commit"] and record["epochs"] == 2 and record["width"] == 0.0625
    assert sorted(p.name for p in outputs.iterdir()) == ["cache", "runs"]
    assert [p.name for p in elsewhere.iterdir() if p.name != ".git"] == []  # nothing written where it ran


def test_vox_outputs_is_the_default_outputs_root_of_an_installed_train(installed, tiny_corpus):
    root, python = installed
    elsewhere = root / "plain_folder"
    elsewhere.mkdir()
    outputs = root / "env_outputs"
    stdout = _run([python, "-m", "voxlib.train", "--manifest", tiny_corpus, "--width", "0.0625", "--epochs", "1",
                   "--eval-crops", "1", "--batch-size", "16"], cwd=elsewhere, env=_clean_env(VOX_OUTPUTS=str(outputs)))
    run = Path(stdout.strip().splitlines()[-1])
    assert run.resolve() == (outputs / "runs" / tiny_corpus.parent.name).resolve()
    assert (run / "predictions.csv").is_file() and list(elsewhere.iterdir()) == []
