"""precision=auto: picks the faster precision by measurement on CPU, caches it, leaves the run unchanged.

The steps here are fakes whose cost is set by the test in seconds of a fake clock that the
measurement reads, so the faster precision is known in advance and nothing depends on how busy the
machine is.
"""
from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from voxlib import precision
from voxlib.config import Config

SHAPE = {"width": 0.25, "heads": {"speaker": 40, "birthplace": 8, "sex": 2}, "batch": 32, "channels_last": True}


class FakeClock:
    """time.perf_counter for precision.py: only the fake steps move it."""

    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch):
    monkeypatch.setattr(precision.time, "perf_counter", FakeClock.perf_counter)


class FakeSteps:
    """make_step for resolve_precision: a step costs ``work[p]`` ms of the fake clock; counts every call."""

    def __init__(self, work: dict[str, int]):
        self.work, self.built, self.calls = work, [], {p: 0 for p in work}

    def __call__(self, p: str):
        self.built.append(p)
        torch.rand(10)  # building a throwaway model draws from the global RNG, as a real one does

        def step():
            self.calls[p] += 1
            np.random.rand(3), random.random(), torch.randn(4)  # so does a training step
            FakeClock.now += self.work[p] / 1000
        return step


def cfg_for(tmp_path, **kw) -> Config:
    return Config(cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("faster", ["fp32", "bf16"])
def test_the_faster_precision_is_chosen_and_recorded(tmp_path, faster):
    slower = "bf16" if faster == "fp32" else "fp32"
    steps = FakeSteps({faster: 2, slower: 40})
    choice = precision.resolve_precision(cfg_for(tmp_path), torch.device("cpu"), steps, SHAPE)
    assert choice.precision == faster and choice.how == "measured"
    assert sorted(steps.built) == ["bf16", "fp32"]
    # 20x apart after the first round: no later round could change the choice, so none is taken
    assert steps.calls == {"fp32": precision.WARMUP_STEPS + 1, "bf16": precision.WARMUP_STEPS + 1}
    speeds = choice.samples_per_s
    assert speeds[faster] > 5 * speeds[slower]
    assert choice.speedup == pytest.approx(speeds["bf16"] / speeds["fp32"])
    record = choice.as_dict()
    assert record["precision"] == faster and record["samples_per_s"] == speeds and record["key"] == choice.key
    assert record["key_fields"]["batch"] == 32 and record["key_fields"]["torch"] == torch.__version__
    json.dumps(record)  # training writes it to the run folder as JSON


def test_rounds_continue_while_the_choice_is_open(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "DECIDED", float("inf"))
    steps = FakeSteps({"fp32": 2, "bf16": 40})
    assert precision.resolve_precision(cfg_for(tmp_path), torch.device("cpu"), steps, SHAPE).precision == "fp32"
    assert steps.calls == {"fp32": precision.WARMUP_STEPS + precision.TIMED_ROUNDS,
                           "bf16": precision.WARMUP_STEPS + precision.TIMED_ROUNDS}


def test_a_gain_inside_the_margin_stays_fp32():
    assert precision.choose({"fp32": 100.0, "bf16": 109.0}) == "fp32"
    assert precision.choose({"fp32": 100.0, "bf16": 111.0}) == "bf16"
    assert precision.choose({"fp32": 100.0, "bf16": 60.0}) == "fp32"


def test_second_resolution_is_served_from_the_cache_without_a_step(tmp_path):
    cfg = cfg_for(tmp_path)
    first = precision.resolve_precision(cfg, torch.device("cpu"), FakeSteps({"fp32": 40, "bf16": 2}), SHAPE)
    again = FakeSteps({"fp32": 40, "bf16": 2})
    second = precision.resolve_precision(cfg, torch.device("cpu"), again, SHAPE)
    assert again.built == [] and again.calls == {"fp32": 0, "bf16": 0}
    assert (second.precision, second.how, second.key) == ("bf16", "cached", first.key)
    assert second.samples_per_s == first.samples_per_s
    # another model shape or batch is another decision
    other = FakeSteps({"fp32": 2, "bf16": 40})
    third = precision.resolve_precision(cfg, torch.device("cpu"), other, {**SHAPE, "batch": 10})
    assert third.how == "measured" and third.precision == "fp32" and third.key != first.key
    stored = json.loads((tmp_path / "cache" / "precision.json").read_text())
    assert set(stored["decisions"]) == {first.key, third.key}


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99}), json.dumps([1, 2])])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, caplog, content):
    path = tmp_path / "cache" / "precision.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    steps = FakeSteps({"fp32": 2, "bf16": 40})
    with caplog.at_level(logging.WARNING, logger="voxlib.precision"):
        choice = precision.resolve_precision(cfg_for(tmp_path), torch.device("cpu"), steps, SHAPE)
    assert choice.how == "measured" and choice.precision == "fp32"
    assert any(str(path) in r.getMessage() for r in caplog.records)
    stored = json.loads(path.read_text())
    assert stored["version"] == precision.CACHE_VERSION and choice.key in stored["decisions"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".precision.json.")]  # no temp left


def test_measuring_leaves_every_rng_where_it_was(tmp_path):
    steps = FakeSteps({"fp32": 1, "bf16": 1})
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    choice = precision.resolve_precision(cfg_for(tmp_path), torch.device("cpu"), steps, SHAPE)
    assert choice.how == "measured" and steps.calls["fp32"] > 0
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_rng_is_restored_when_a_step_fails(tmp_path):
    def make_step(p):
        def step():
            torch.rand(3)
            raise RuntimeError("out of memory")
        return step

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with pytest.raises(RuntimeError, match="out of memory"):
        precision.resolve_precision(cfg_for(tmp_path), torch.device("cpu"), make_step, SHAPE)
    assert torch.equal(torch.rand(3), expected)
    assert not (tmp_path / "cache" / "precision.json").exists()


def test_cuda_is_bf16_and_explicit_settings_win_without_measuring(tmp_path):
    never = FakeSteps({"fp32": 1, "bf16": 1})
    cuda = precision.resolve_precision(cfg_for(tmp_path), torch.device("cuda"), never, SHAPE)
    assert (cuda.precision, cuda.how) == ("bf16", "device")
    for asked in ("fp32", "bf16"):
        for device in ("cpu", "cuda"):
            choice = precision.resolve_precision(cfg_for(tmp_path, precision=asked), torch.device(device), never, SHAPE)
            assert (choice.precision, choice.how) == (asked, "asked")
    assert never.built == [] and not (tmp_path / "cache").exists()


def test_the_key_names_machine_torch_and_shape():
    fields = precision.machine_key(torch.device("cpu"))
    assert fields["torch"] == torch.__version__ and fields["threads"] == torch.get_num_threads()
    assert fields["cpu"] and len(fields["cpu_flags"]) == 16


# --- noise -------------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [False, True])
def test_one_burst_of_load_neither_wins_nor_vetoes(native):
    """The rounds' median decides, with two thirds of them agreeing: a single slowed round changes nothing."""
    assert precision.decide([1.9, 1.8, 0.4, 1.85, 1.9], native) == ("bf16", "faster")  # burst on bf16's turn
    assert precision.decide([0.5, 0.55, 1.6, 0.52, 0.5], native) == ("fp32", "faster")  # burst on fp32's turn


@pytest.mark.parametrize("ratios", [[1.05, 0.97, 1.02, 1.04, 0.99],  # no real difference
                                    [1.5, 0.7, 1.4, 0.8, 1.3],  # median clear, rounds split 3:2
                                    [0.95, 0.7, 1.2, 0.85, 1.3]])
def test_a_measurement_within_noise_keeps_the_cpus_native_precision(ratios):
    for native, kept in ((True, "bf16"), (False, "fp32")):
        chosen, reason = precision.decide(ratios, native)
        assert chosen == kept and reason.startswith("within noise") and "native" in reason


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    for flags, native in ((["avx2", "fma"], False), (["avx512f", "avx512_bf16"], True), (["amx_bf16"], True),
                          (["fp", "asimd", "bf16"], True)):
        monkeypatch.setattr(precision, "cpu_model_and_flags", lambda flags=flags: ("cpu", flags))
        assert precision.native_bf16() is native


class ClockedSteps:
    """make_step whose steps cost ``cost[p]`` seconds of a fake clock (no timing of this machine); the
    ``burst``-th timed step of ``burst_on`` costs 30 times as much, like a neighbour's burst of load."""

    def __init__(self, cost: dict[str, float], burst_on: str, burst: int):
        self.cost, self.burst_on, self.burst = cost, burst_on, burst
        self.calls = {p: 0 for p in cost}

    def __call__(self, p: str):
        def step():
            self.calls[p] += 1
            slow = p == self.burst_on and self.calls[p] == precision.WARMUP_STEPS + self.burst
            FakeClock.now += self.cost[p] * (30 if slow else 1)
        return step


@pytest.mark.parametrize("faster,burst_on", [("bf16", "bf16"), ("fp32", "fp32")])
def test_a_simulated_burst_during_measurement_leaves_the_choice_and_is_recorded(tmp_path, monkeypatch, faster,
                                                                               burst_on):
    slower = "fp32" if faster == "bf16" else "bf16"
    steps = ClockedSteps({faster: 1.0, slower: 2.0}, burst_on=burst_on, burst=2)
    monkeypatch.setattr(precision, "DECIDED", float("inf"))  # every round is taken, as on a close call
    monkeypatch.setattr(precision, "native_bf16", lambda: faster != "bf16")  # native would be the wrong pick
    choice = precision.resolve_precision(cfg_for(tmp_path), torch.device("cpu"), steps, SHAPE)
    assert (choice.precision, choice.reason) == (faster, "faster")
    ratio = 2.0 if faster == "bf16" else 0.5  # bf16 speed over fp32 speed
    burst = 2.0 / 30 if faster == "bf16" else 30 / 2.0  # the second round: the faster one ran 30x its cost
    assert choice.rounds == pytest.approx([ratio, burst, ratio, ratio, ratio])
    assert choice.samples_per_s[faster] == pytest.approx(SHAPE["batch"] / 1.0)  # the median round, not the burst
    record = choice.as_dict()
    assert set(record["load"]) == {"before", "after", "cores"} and record["load"]["cores"] >= 1
    assert record["rounds"] == choice.rounds
    stored = json.loads((tmp_path / "cache" / "precision.json").read_text())["decisions"][choice.key]
    assert stored["rounds"] == choice.rounds and stored["load"] == record["load"]


def test_decisions_of_an_earlier_rule_are_measured_again(tmp_path):
    path = tmp_path / "cache" / "precision.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": precision.CACHE_VERSION - 1, "decisions": {}}))
    steps = FakeSteps({"fp32": 2, "bf16": 40})
    assert precision.resolve_precision(cfg_for(tmp_path), torch.device("cpu"), steps, SHAPE).how == "measured"
