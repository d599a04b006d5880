"""Config: one dataclass for CLI flags and notebook parameters; bad values fail loudly."""
import pytest

from voxlib.cli import parse_config
from voxlib.config import ACCENT_PRESET, SEED_PRESET, Config, ConfigError


def test_defaults_are_cpu_friendly_and_seed_preset_is_the_2019_protocol():
    assert Config().width < 1.0
    seed = Config.from_dict({"preset": "seed"})
    assert (seed.width, seed.batch_size, seed.lr, seed.epochs, seed.optimizer) == (1.0, 10, 1e-5, 1000, "rmsprop")
    assert set(SEED_PRESET) <= set(Config().to_dict())


def test_explicit_values_win_over_the_preset():
    cfg = Config.from_dict({"preset": "seed", "epochs": 3, "width": 0.5})
    assert (cfg.epochs, cfg.width, cfg.batch_size) == (3, 0.5, 10)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": "ten"}, "'epochs' must be int, got str 'ten'"),
        ({"epochs": True}, "'epochs' must be int"),
        ({"lr": "0.1"}, "'lr' must be float"),
        ({"compile": 1}, "'compile' must be bool"),
        ({"optimizer": "sgd"}, "'optimizer' must be one of"),
        ({"epochs": 0}, "'epochs' must be in [1, 1e+06], got 0"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction + test_fraction"),
        ({"head_weights": "birthplace:2"}, "not name=number"),
        ({"batch_sise": 4}, "unknown parameter(s) ['batch_sise']"),
    ],
)
def test_bad_values_name_the_parameter(values, message):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(values)
    assert message in str(err.value)


def test_int_is_accepted_for_float_fields():
    cfg = Config.from_dict({"lr": 1})
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0


def test_cli_flags_are_the_fields():
    from voxlib.cli import parse_config

    cfg = parse_config(["--batch-size", "7", "--no-compile", "--channels-last", "--preset", "seed"])
    assert (cfg.batch_size, cfg.compile, cfg.channels_last, cfg.lr) == (7, False, True, 1e-5)
    with pytest.raises(SystemExit):
        parse_config(["--optimizer", "sgd"])


def test_notebook_namespace_catches_unknown_injected_parameters():
    import math

    namespace = {"epochs": 2, "math": math, "_private": 1, "In": [], "helper": len}
    assert Config.from_namespace(namespace).epochs == 2
    with pytest.raises(ConfigError, match="epohcs"):
        Config.from_namespace({**namespace, "epohcs": 3})


def test_head_weights_parse():
    assert Config(head_weights="birthplace=2, sex=0.5").head_weight_map() == {"birthplace": 2.0, "sex": 0.5}
    assert Config(labels="speaker, sex").head_names() == ["speaker", "sex"]



def test_preset_accent_resolves_its_remedies_and_leaves_the_rest():
    plain, accent = Config(), Config.from_dict({"preset": "accent", "epochs": 3})
    for name, value in ACCENT_PRESET.items():
        assert getattr(accent, name) == value, name
    untouched = set(plain.to_dict()) - set(ACCENT_PRESET) - {"preset", "epochs"}
    assert {k: getattr(accent, k) for k in untouched} == {k: getattr(plain, k) for k in untouched}
    assert accent.epochs == 3 and accent.preset_notes == []
    again = accent.replace(run_dir="x")  # rebuilding a resolved config changes nothing
    assert {k: v for k, v in again.to_dict().items() if k != "run_dir"} == \
        {k: v for k, v in accent.to_dict().items() if k != "run_dir"}


def numeric_accent_setting() -> tuple[str, float]:
    return next((k, v) for k, v in ACCENT_PRESET.items() if isinstance(v, float) and v > 0)


def test_an_explicit_value_wins_over_preset_accent_and_is_reported():
    name, value = numeric_accent_setting()
    other = value / 2
    cfg = parse_config(["--preset", "accent", f"--{name.replace('_', '-')}", str(other)])
    assert getattr(cfg, name) == other
    assert any(f"explicit {name}={other!r}" in note for note in cfg.preset_notes)


def test_a_flag_at_its_default_cannot_silently_lose_to_the_preset():
    name, _ = numeric_accent_setting()
    default = Config().to_dict()[name]
    with pytest.raises(ConfigError, match=f"preset 'accent' sets {name}; a value equal to the default cannot undo it"):
        parse_config(["--preset", "accent", f"--{name.replace('_', '-')}", str(default)])


def test_accent_preset_resolves_to_the_remedies_and_explicit_values_still_win():
    accent = Config.from_dict({"preset": "accent"})
    assert {name: getattr(accent, name) for name in ACCENT_PRESET} == ACCENT_PRESET
    assert accent.width == Config().width and accent.epochs == Config().epochs  # fields not in it keep theirs
    assert accent.accent_branch == 6 and accent.input_lifter > 0 and accent.pooled_heads == "birthplace"
    assert accent.preset_notes == []
    mine = Config.from_dict({"preset": "accent", "perturb_pitch": 0.1, "width": 0.125})
    assert (mine.perturb_pitch, mine.width, mine.perturb_formant) == (0.1, 0.125, ACCENT_PRESET["perturb_formant"])
    assert mine.preset_notes == [f"preset 'accent' sets perturb_pitch={ACCENT_PRESET['perturb_pitch']!r}; the "
                                 f"explicit perturb_pitch=0.1 wins"]
    again = Config.from_dict(accent.to_dict())  # a run's recorded settings replay to the same values
    assert again.to_dict() == accent.to_dict() and again.preset_notes == []
    for off in ("", "seed"):  # every remedy is off unless asked for
        cfg = Config(preset=off)
        assert (cfg.accent_branch, cfg.input_lifter, cfg.pooled_heads, cfg.perturb_formant, cfg.speaker_adversary,
                cfg.utterance_norm, cfg.trunk_dropout, cfg.weight_decay) == (0, 0, "", 0.0, 0.0, False, 0.0, 0.0)
