"""What a run writes for TensorBoard, read back with TensorBoard's own EventAccumulator."""
import shutil

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from voxlib import runfolder
from voxlib.config import Config
from voxlib.train import train

# a label that mathtext cannot parse: drawn as text it is fine, parsed as math it raises
DOLLAR = r"$\nosuchcommand$"


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    shutil.copytree(tiny_corpus.parent, root / "corpus")
    manifest = root / "corpus" / "manifest.csv"
    table = pd.read_csv(manifest)
    table["birthplace"] = table["birthplace"].replace({"east": DOLLAR})
    table.to_csv(manifest, index=False)
    cfg = Config(manifest=str(manifest), run_dir=str(root / "run"), cache_dir=str(root / "cache"), width=0.0625,
                 epochs=2, eval_crops=1, batch_size=16, lr_schedule="cosine")
    run_dir = train(cfg)
    events = EventAccumulator(str(run_dir / runfolder.TENSORBOARD), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return run_dir, events


def test_a_confusion_figure_per_head_and_epoch(run):
    _, events = run
    images = events.Tags()["images"]
    for head in ("speaker", "birthplace", "sex"):
        shots = events.Images(f"confusion/seen_val/{head}")
        assert [s.step for s in shots] == [1, 2]
        assert all(s.encoded_image_string[:4] == b"\x89PNG" and s.width > 200 for s in shots)
    assert sorted(images) == [f"confusion/seen_val/{h}" for h in ("birthplace", "sex", "speaker")]


def test_hparams_hold_every_scalar_setting_and_the_best_epochs_accuracies(run):
    run_dir, events = run
    content = events.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
    start = next(d.session_start_info for d in data.values() if d.HasField("session_start_info"))
    assert start.hparams["lr_schedule"].string_value == "cosine"
    assert start.hparams["width"].number_value == 0.0625 and start.hparams["epochs"].number_value == 2
    assert start.hparams["channels_last"].bool_value in (True, False)
    experiment = next(d.experiment for d in data.values() if d.HasField("experiment"))
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"hparam/seen_val/speaker/acc", "hparam/unseen_val/birthplace/acc", "hparam/best_epoch"} <= metrics
    best = runfolder.read_json(run_dir / runfolder.SUMMARY)["best_epoch"]
    rows = runfolder.read_metric_rows(run_dir / runfolder.METRICS)
    expected = next(v for e, s, h, m, v in rows if (e, s, h, m) == (best, "seen_val", "sex", "acc"))
    (logged,) = events.Scalars("hparam/seen_val/sex/acc")
    assert logged.value == pytest.approx(expected, abs=1e-6) and logged.step == 2
    assert events.Scalars("hparam/best_epoch")[0].value == best
