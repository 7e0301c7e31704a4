"""Configuration: validation messages, presets, derived sizes and JSON round-trips."""

from __future__ import annotations

import pytest

from bdh import BDHConfig, ConfigError


def test_defaults_are_the_references():
    c = BDHConfig()
    assert (c.n_layer, c.n_embd, c.n_head, c.mlp_internal_dim_multiplier) == (6, 256, 4, 128)
    assert (c.dropout, c.vocab_size, c.N, c.n) == (0.1, 256, 8192, 32768)
    assert c.attention == "auto" and c.damping is None and not c.no_bptt
    # The reference preset is that shape, damped like every preset; undamped, it is the code.
    assert BDHConfig.from_name("reference", damping=None) == c
    assert BDHConfig.from_name("reference") == c.replace(damping="alibi")


def test_presets_and_sizes():
    small, tiny = BDHConfig.from_name("small"), BDHConfig.from_name("tiny")
    assert 1_000_000 <= small.num_params <= 10_000_000
    assert tiny.num_params < small.num_params
    assert BDHConfig.from_name("tiny", n_layer=3).n_layer == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_layer": 0}, "n_layer must be a positive integer, got 0"),
        ({"n_embd": 2.5}, "n_embd must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"n_head": 3}, "must be divisible by n_head"),
        ({"n_embd": 3, "n_head": 1, "mlp_internal_dim_multiplier": 1}, "must be even"),
        ({"attention": "flash"}, "attention must be one of"),
        ({"residual": "x"}, "residual must be one of"),
        ({"damping": 1.5}, r"damping values must be in \(0, 1\]"),
        ({"damping": [0.9]}, "damping must be one float or a list of n_head=4"),
        ({"rope": "yes"}, "rope must be true or false"),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BDHConfig(**kwargs)


def test_unknown_preset_and_fields():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        BDHConfig.from_name("huge")
    with pytest.raises(ConfigError, match="unknown config field"):
        BDHConfig.from_dict({"n_layers": 3})


def test_json_round_trip(tmp_path):
    c = BDHConfig.from_name("tiny", damping=[0.5, 1.0], meta={"preset": "tiny"})
    assert BDHConfig.from_json(c.to_json()) == c
    path = tmp_path / "config.json"
    c.to_json(path)
    assert BDHConfig.from_json(path) == c
    with pytest.raises(ConfigError, match="config file not found"):
        BDHConfig.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        BDHConfig.from_json(tmp_path / "bad.json")
