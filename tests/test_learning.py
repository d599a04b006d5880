"""The pieces learn together: one epoch on the tiny corpus lowers every head's loss."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from voxlib.config import Config
from voxlib.corpora import read_manifest
from voxlib.data import CropDataset, build_vocabularies, encode_targets
from voxlib.features import FeatureCache
from voxlib.model import Discriminator


def test_one_epoch_on_the_tiny_corpus_lowers_the_loss(tiny_corpus, tmp_path):
    cfg = Config(manifest=str(tiny_corpus), cache_dir=str(tmp_path / "cache"), width=1 / 16)
    manifest = read_manifest(tiny_corpus, progress=False, cache_dir=tmp_path / "cache")
    cache = FeatureCache.build_or_open(manifest, cfg, workers=1, progress=False)
    table = manifest.table
    everything = pd.Series("train", index=table.index)
    vocab = build_vocabularies(table, everything, ["speaker", "birthplace", "sex"])
    targets, _ = encode_targets(table, vocab)
    data = CropDataset(cache, np.arange(len(table)), targets, train=True, seed=0)

    torch.manual_seed(0)
    model = Discriminator({head: len(classes) for head, classes in vocab.items()}, width=1 / 16)
    optimiser = torch.optim.RMSprop(model.parameters(), lr=cfg.lr)

    def losses() -> dict[str, float]:
        """Mean cross-entropy per head over the whole corpus (batch statistics, no update)."""
        sums = dict.fromkeys(vocab, 0.0)
        with torch.no_grad():
            for x, y, _ in DataLoader(data, batch_size=24):
                for head, logits in model(x).items():
                    sums[head] += F.cross_entropy(logits, y[head], reduction="sum").item()
        return {head: total / len(data) for head, total in sums.items()}

    before = losses()
    assert before["speaker"] > 0.8 * np.log(len(vocab["speaker"]))  # starts near chance
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    for x, y, _ in loader:
        optimiser.zero_grad()
        sum(F.cross_entropy(logits, y[head]) for head, logits in model(x).items()).backward()
        optimiser.step()
    after = losses()
    for head in vocab:
        assert after[head] < 0.9 * before[head], (head, before[head], after[head])
