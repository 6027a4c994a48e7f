"""LoraConfig: validation at construction and per-module resolution of patterns."""

from __future__ import annotations

import json
import math

import pytest

from lorakit import LoraConfig


@pytest.mark.parametrize("r", [0, -1, 2.5, True, "8", None])
def test_bad_rank_is_refused_at_construction(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoraConfig(r=r)


@pytest.mark.parametrize("alpha", [0, -1.0, math.inf, math.nan, "16", True])
def test_bad_alpha_is_refused_at_construction(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        LoraConfig(alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, "0.1"])
def test_dropout_outside_zero_one_is_refused(dropout):
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LoraConfig(dropout=dropout)


def test_unknown_bias_and_init_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="bias must be one of .*'lora_only'"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="init must be one of .*'gaussian'"):
        LoraConfig(init="xavier")


def test_bad_patterns_and_enable_lora_are_refused():
    with pytest.raises(ValueError, match=r"rank_pattern\['q'\]"):
        LoraConfig(rank_pattern={"q": 0})
    with pytest.raises(ValueError, match=r"alpha_pattern\['q'\]"):
        LoraConfig(alpha_pattern={"q": -2})
    with pytest.raises(ValueError, match="enable_lora"):
        LoraConfig(enable_lora={"c_attn": [False, False, False]})
    with pytest.raises(ValueError, match="empty list"):
        LoraConfig(target_modules=[])


def test_valid_config_keeps_its_values_and_normalises_collections():
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=("v_proj", "q_proj"), modules_to_save=("score",))
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.modules_to_save == ["score"]
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.bias, cfg.init) == (4, 8, 0.1, "none", "kaiming")


def test_rank_and_alpha_patterns_match_the_path_suffix():
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 4}, alpha_pattern={"q_proj": 3})
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 4
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert cfg.rank_for("model.layers.0.self_attn.xv_proj") == 8  # suffix match is per dotted segment
    assert cfg.alpha_for("model.layers.0.self_attn.q_proj") == 3.0
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 16.0


def test_replace_validates_and_to_dict_round_trips():
    cfg = LoraConfig(r=4, target_modules=["q"])
    assert LoraConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        cfg.replace(r=0)
    assert cfg.replace(r=2).r == 2 and cfg.r == 4


@pytest.mark.parametrize("field, value", [("target_modules", 5), ("exclude_modules", [1]), ("modules_to_save", "classifier")])
def test_module_name_fields_of_the_wrong_type_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a list of module names"):
        LoraConfig(**{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("use_rslora", "false", "use_rslora must be True or False"),
    ("lora_bias", "no", "lora_bias must be True or False"),
    ("layers", "0", "layers must be a block index"),
    ("layers", 1.5, "layers must be a block index"),
    ("layers", [0, "1"], "layers must be a block index"),
    ("layers_pattern", 3, "layers_pattern must be a module name"),
    ("rank_pattern", ["q"], "rank_pattern must be a dict"),
    ("alpha_pattern", "q", "alpha_pattern must be a dict"),
    ("base_model_name_or_path", 7, "base_model_name_or_path must be a string"),
])
def test_fields_of_the_wrong_type_are_refused_at_construction(field, value, message):
    """bool("false") is True: a string flag would silently switch rsLoRA on and then write an unloadable file."""
    with pytest.raises(ValueError, match=message):
        LoraConfig(**{field: value})


def test_numpy_integers_are_plain_ints_after_construction():
    np = pytest.importorskip("numpy")
    cfg = LoraConfig(r=np.int64(8), layers=[np.int64(1), 2], rank_pattern={"q": 4})
    assert type(cfg.r) is int and cfg.layers == [1, 2] and all(type(i) is int for i in cfg.layers)
    json.dumps(cfg.to_dict())  # what save_adapter writes
    assert LoraConfig(layers=np.int32(3)).layers == 3


def test_numpy_scalars_for_alpha_dropout_and_patterns_become_plain_numbers():
    np = pytest.importorskip("numpy")
    cfg = LoraConfig(alpha=np.int64(16), dropout=np.float32(0.125), rank_pattern={"q": np.int64(4)},
                     alpha_pattern={"q": np.float32(3.0)})
    assert (cfg.alpha, cfg.dropout, cfg.rank_pattern, cfg.alpha_pattern) == (16, 0.125, {"q": 4}, {"q": 3.0})
    assert type(cfg.alpha) is int and type(cfg.dropout) is float
    assert type(cfg.rank_pattern["q"]) is int and type(cfg.alpha_pattern["q"]) is float
    json.dumps(cfg.to_dict())  # what save_adapter writes
    assert type(LoraConfig(alpha=np.float64(8.5)).alpha) is float


def test_fields_set_after_construction_are_checked_and_made_plain_at_inject(tmp_path):
    np = pytest.importorskip("numpy")
    import lorakit
    from conftest import tiny_llama

    cfg = LoraConfig(target_modules=["q_proj"])
    cfg.alpha = np.float32(3)
    model = lorakit.inject(tiny_llama(), cfg)
    lorakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 3.0
    cfg.r = -1
    with pytest.raises(ValueError, match="r must be a positive integer, got -1"):
        lorakit.inject(tiny_llama(), cfg)
