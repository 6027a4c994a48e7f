"""Injection into tiny LLaMA / GPT-2 / BERT: targets, defaults, patterns, freezing, bad input."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

import lorakit
from conftest import BUILDERS, logits, tiny_bert, tiny_gpt2, tiny_llama
from lorakit.adapters import randomize_adapters
from lorakit.injection import DEFAULT_TARGETS
from lorakit.layers import LoraLayer

archs = pytest.mark.parametrize("arch", list(BUILDERS))


def _adapted(model: nn.Module) -> dict[str, LoraLayer]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer)}


def _snapshot(model: nn.Module) -> tuple:
    """Everything 'untouched' means: classes, state dict keys and values, requires_grad, no lorakit state."""
    return (
        [(p, type(m)) for p, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        "_lorakit" in model.__dict__,
    )


def _assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0]
    assert list(before[1]) == list(after[1])
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2] == after[2]
    assert before[3] == after[3]


# ---- default targets -------------------------------------------------------------------------------

def test_default_targets_llama_are_q_and_v_proj():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2))
    assert sorted(_adapted(model)) == [f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")]


def test_default_targets_gpt2_are_the_q_and_v_slices_of_c_attn():
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2))
    layers = _adapted(model)
    assert sorted(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(m.lora_specs["default"].enabled == (True, False, True) for m in layers.values())
    assert lorakit.trainable_parameters(model)[0] == 2 * 2 * 2 * (32 + 32)  # layers · slices · r · (d_in + d_slice)


def test_default_targets_bert_are_query_and_value():
    model = lorakit.inject(tiny_bert(), lorakit.LoraConfig(r=2))
    assert sorted(_adapted(model)) == sorted(
        f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")
    )


@pytest.mark.parametrize(("name", "kwargs", "expected"), [
    ("MPNetModel", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64), {"q", "v"}),
    ("CodeGenModel", dict(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=64), {"qkv_proj"}),
])
def test_default_targets_match_each_architectures_own_layer_names(name, kwargs, expected):
    cls = getattr(transformers, name)
    model = cls(cls.config_class(vocab_size=64, **kwargs))
    assert {p.rsplit(".", 1)[-1] for p in _adapted(lorakit.inject(model, lorakit.LoraConfig(r=2)))} == expected


def test_default_targets_fall_back_on_common_names_without_a_config():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wk, self.wv = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    model = lorakit.inject(nn.Sequential(Attn()), lorakit.LoraConfig(r=1))
    assert sorted(_adapted(model)) == ["0.wq", "0.wv"]


VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=8, patch_size=4)


@pytest.mark.parametrize("name", ["ViTModel", "DeiTModel"])
def test_default_targets_of_vit_and_deit_are_their_query_and_value_projections(name):
    """transformers renamed ViT's / DeiT's query, value to q_proj, v_proj: the default takes whichever the model has."""
    cls = getattr(transformers, name)
    model = cls(cls.config_class(**VIT))
    expected = {"q_proj", "v_proj"} if any(p.endswith(".q_proj") for p, _ in model.named_modules()) else {"query", "value"}
    adapted = _adapted(lorakit.inject(model, lorakit.LoraConfig(r=2)))
    assert len(adapted) == 2 and {p.rsplit(".", 1)[-1] for p in adapted} == expected


@pytest.mark.parametrize("names", [["query", "value"], ["q_proj", "v_proj"]])
def test_default_targets_of_a_type_whose_layers_have_other_names_fall_back_on_common_names(names):
    model = nn.Sequential(nn.ModuleDict({n: nn.Linear(4, 4) for n in (names[0], "key", names[1])}))
    model.config = SimpleNamespace(model_type="vit")
    assert sorted(_adapted(lorakit.inject(model, lorakit.LoraConfig(r=1)))) == sorted(f"0.{n}" for n in names)


def test_a_type_without_its_default_names_or_common_ones_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = SimpleNamespace(model_type="vit")
    with pytest.raises(ValueError, match=r"model_type='vit', which lacks its type's \['q_proj', 'v_proj'\]\): pass target_modules"):
        lorakit.inject(model, lorakit.LoraConfig(r=1))


def test_default_targets_are_keyed_by_transformers_own_model_type():
    known = set(transformers.CONFIG_MAPPING.keys())
    misspelt = [t for t in DEFAULT_TARGETS if t not in known and {t.replace("_", "-"), t.replace("-", "_")} & known]
    assert misspelt == [] and transformers.NllbMoeConfig.model_type in DEFAULT_TARGETS


def test_unknown_architecture_without_targets_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"cannot pick default target modules .*pass target_modules"):
        lorakit.inject(model, lorakit.LoraConfig(r=1))
    _assert_same(before, _snapshot(model))


# ---- target forms and filters ----------------------------------------------------------------------

def test_all_linear_adapts_every_linear_but_the_output_head():
    llama = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules="all-linear"))
    names = {p.rsplit(".", 1)[-1] for p in _adapted(llama)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(_adapted(llama)) == 14 and "lm_head" not in _adapted(llama)
    gpt2 = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert len(_adapted(gpt2)) == 8 and "lm_head" not in _adapted(gpt2)
    assert all(m.lora_specs["default"].enabled is None for m in _adapted(gpt2).values())


def test_all_linear_leaves_a_classification_head_alone():
    bert = lorakit.inject(tiny_bert(), lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert "classifier" not in _adapted(bert) and "bert.pooler.dense" in _adapted(bert)


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_invalid_regex_is_refused_at_config(field):
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lorakit.LoraConfig(**{field: "[bad"})


def test_regex_target_matches_the_full_path():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=r".*\.1\.self_attn\.(q|v)_proj"))
    assert sorted(_adapted(model)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_list_targets_match_dotted_suffixes_only():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["self_attn.q_proj"]))
    assert sorted(_adapted(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="matched no module"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["_proj"]))


@pytest.mark.parametrize("layers", [1, [1]])
def test_layers_restricts_to_block_indices(layers):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers=layers))
    assert sorted(_adapted(model)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    bert = lorakit.inject(tiny_bert(), lorakit.LoraConfig(r=2, target_modules=["query"], layers=layers, layers_pattern="layer"))
    assert sorted(_adapted(bert)) == ["bert.encoder.layer.1.attention.self.query"]


def test_layers_finds_blocks_at_the_top_level_too():
    model = nn.Module()
    model.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(4, 4), "v": nn.Linear(4, 4)}) for _ in range(3))
    lorakit.inject(model, lorakit.LoraConfig(r=1, target_modules=["q", "v"], layers=[0, 2]))
    assert sorted(_adapted(model)) == ["layers.0.q", "layers.0.v", "layers.2.q", "layers.2.v"]


def test_exclude_modules_wins_over_targets():
    model = lorakit.inject(
        tiny_llama(), lorakit.LoraConfig(r=2, target_modules="all-linear", exclude_modules=["v_proj", "mlp.down_proj"])
    )
    names = {p.rsplit(".", 1)[-1] for p in _adapted(model)}
    assert names == {"q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"}
    regex = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], exclude_modules=r".*\.0\..*"))
    assert sorted(_adapted(regex)) == ["model.layers.1.self_attn.q_proj"]


def test_rank_and_alpha_patterns_give_per_module_r_alpha_and_shapes():
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                             alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32})
    model = lorakit.inject(tiny_llama(), cfg)
    layers = _adapted(model)
    v0, q0, q1 = (layers[f"model.layers.{i}.self_attn.{n}"] for i, n in ((0, "v_proj"), (0, "q_proj"), (1, "q_proj")))
    assert (v0.lora_specs["default"].r, v0.lora_specs["default"].scale) == (2, 4.0)
    assert tuple(v0.lora_A["default"].shape) == (2, 32) and tuple(v0.lora_B["default"].shape) == (16, 2)
    assert (q0.lora_specs["default"].r, q0.lora_specs["default"].scale) == (4, 2.0)
    assert (q1.lora_specs["default"].r, q1.lora_specs["default"].scale) == (4, 8.0)
    assert lorakit.trainable_parameters(model)[0] == 2 * (4 * (32 + 32) + 2 * (32 + 16))


def test_use_rslora_scales_by_alpha_over_sqrt_r():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=6, target_modules=["q_proj"], use_rslora=True))
    layer = _adapted(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_specs["default"].scale == pytest.approx(6 / math.sqrt(4))
    randomize_adapters(model)
    expected = 3.0 * layer.lora_B["default"] @ layer.lora_A["default"]
    torch.testing.assert_close(layer.delta_weight("default"), expected.detach())


def test_r_above_min_d_k_warns_naming_the_layer():
    with pytest.warns(UserWarning) as record:
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=20, target_modules=["q_proj", "v_proj"]))
    assert [str(w.message).split(":")[0] for w in record] == [
        f"r=20 exceeds min(d_out, d_in)=16 of layer 'model.layers.{i}.self_attn.v_proj'" for i in (0, 1)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))


def test_r_above_a_fused_slice_size_warns():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(3 * 4, 12))
    with pytest.warns(UserWarning, match=r"r=5 exceeds min\(d_out, d_in\)=4 of layer '0'"):
        lorakit.inject(model, lorakit.LoraConfig(r=5, target_modules=["0"], enable_lora={"0": [True, False, True]}))


def test_conv_rank_is_bounded_by_the_flattened_kernel_not_the_channels():
    """ΔW of Conv2d(3, 8, 3) is 8 × 27: r=4 is reachable (it warned 'exceeds 3'); r=9 is not."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.inject(nn.Sequential(nn.Conv2d(3, 8, 3)), lorakit.LoraConfig(r=4, target_modules=["0"]))
    with pytest.warns(UserWarning, match=r"r=9 exceeds min\(d_out, d_in\)=8 of layer '0'"):
        lorakit.inject(nn.Sequential(nn.Conv2d(3, 8, 3)), lorakit.LoraConfig(r=9, target_modules=["0"]))


# ---- the model after injection --------------------------------------------------------------------

@archs
def test_output_equals_base_at_init_exactly(arch, input_ids):
    model = BUILDERS[arch]()
    base = logits(model, input_ids)
    assert lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=8, target_modules="all-linear")) is model
    assert torch.equal(logits(model, input_ids), base)


@archs
def test_trainable_count_is_sum_of_r_times_d_in_plus_d_out(arch):
    model = BUILDERS[arch]()
    total = sum(p.numel() for p in model.parameters())
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8))
    expected = 0
    for layer in _adapted(model).values():
        d_out, d_in = layer.base_shape()
        enabled = layer.lora_specs["default"].enabled
        expected += 4 * (d_in + d_out) if enabled is None else sum(enabled) * 4 * (d_in + d_out // len(enabled))
    assert lorakit.trainable_parameters(model) == (expected, total + expected)


@archs
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_adapter_params_saved_modules_and_chosen_biases_train(arch, bias, input_ids):
    model = BUILDERS[arch]()
    head = {"llama": "lm_head", "gpt2": "ln_f", "bert": "classifier"}[arch]
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, bias=bias, modules_to_save=[head]))
    randomize_adapters(model, std=0.05)
    adapted = _adapted(model)
    expected = {n for n, _ in model.named_parameters() if ".lora_" in n}
    expected |= {n for n, _ in model.named_parameters() if f".{head}.modules_to_save.default." in f".{n}"}
    if bias == "all":  # the base head's own bias stays frozen: the adapter trains its copy
        expected |= {n for n, _ in model.named_parameters() if n.endswith(".bias") and ".lora_" not in n and ".original_module." not in n}
    elif bias == "lora_only":
        expected |= {f"{p}.bias" for p, m in adapted.items() if m.bias is not None}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids).logits.float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in expected), n
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in expected or p.grad.abs().sum() == 0), n


def test_modules_to_save_are_never_adapted_and_train_whole():
    model = lorakit.inject(tiny_bert(), lorakit.LoraConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"]))
    assert "classifier" not in _adapted(model)
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert lorakit.trainable_parameters(model)[0] == sum(
        p.numel() for n, p in model.named_parameters() if ".lora_" in n or n.startswith("classifier.modules_to_save.")
    )


def test_gpt3_shaped_model_on_meta_reports_the_papers_18_9m():
    class Block(nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    class GPT3(nn.Module):
        def __init__(self, n_layer: int = 96, d: int = 12288):
            super().__init__()
            self.layers = nn.ModuleList(Block(d) for _ in range(n_layer))

    with torch.device("meta"):
        model = GPT3()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=4, target_modules=["q", "v"]))
    trainable, total = lorakit.trainable_parameters(model)
    assert trainable == 18_874_368  # the paper's Table 4: 18.9M for r=4 on Wq, Wv
    assert trainable // 4 == 4_718_592  # 4.7M per rank unit
    assert total == 96 * 4 * 12288**2 + trainable
    layer = model.layers[0].q
    assert layer.lora_A["default"].is_meta and layer.lora_A["default"].shape == (4, 12288)
    assert not layer.weight.requires_grad
    assert "trainable params: 18,874,368" in lorakit.summary(model)


def test_tiny_llama_on_meta_injects_and_materialises():
    with torch.device("meta"):
        model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    layer = _adapted(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A["default"].is_meta and layer.lora_B["default"].shape == (32, 2)
    model.to_empty(device="cpu")
    assert layer.lora_A["default"].device.type == "cpu"


# ---- bad input --------------------------------------------------------------------------------------

@archs
def test_target_matching_nothing_lists_close_names_and_leaves_the_model_untouched(arch):
    model = BUILDERS[arch]()
    before = _snapshot(model)
    wanted = {"llama": "q_prj", "gpt2": "c_atn", "bert": "querry"}[arch]
    close = {"llama": "q_proj", "gpt2": "c_attn", "bert": "query"}[arch]
    with pytest.raises(ValueError, match=rf"matched no module.*Closest names that exist: \[.*'{close}'"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=[wanted]))
    _assert_same(before, _snapshot(model))


def test_one_unmatched_name_in_a_list_fails_the_whole_injection():
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"\['v_prj'\] matched no module.*'v_proj'"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_prj"]))
    _assert_same(before, _snapshot(model))


def test_targets_restricted_by_layers_to_nothing_name_the_layers():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"in layers \[7\]"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], layers=[7]))
    assert not _adapted(model)


def test_unsupported_target_type_is_refused_before_any_change():
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"LlamaRMSNorm.*It holds no layer lorakit can adapt; the adaptable layers of this model are "
                                         r"named \['embed_tokens', 'q_proj'"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "input_layernorm"]))
    with pytest.raises(ValueError, match=r"LlamaAttention.*Name the linear layers inside it instead, e.g. \['q_proj'"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["self_attn"]))
    _assert_same(before, _snapshot(model))


def test_no_match_messages_name_the_likely_cause():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"target_modules 'q_proj' matched no module.*A string is a regular expression "
                                         r"over full module paths.*pass a list: \['q_proj'\]"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="q_proj"))
    with pytest.raises(ValueError, match=r"All 14 modules it matches are excluded by exclude_modules='\.\*'"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear", exclude_modules=".*"))


def test_a_target_that_names_a_shared_module_by_its_second_name_is_told_the_first():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # one module object, reached as "0" and "2"
    with pytest.raises(ValueError, match=r"'2' is the module '0' under a second name: one module object is adapted "
                                         r"once, under its first name; target that name"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["2"]))
    with pytest.raises(ValueError, match=r"'2' is the module '0' under a second name"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="2"))


def test_grouped_conv_is_refused_before_any_change():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"target '1' cannot carry LoRA: it is a grouped convolution \(groups=2\).*"
                                         r"exclude_modules=\['1'\]"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0", "1"]))
    _assert_same(before, _snapshot(model))


def test_unknown_modules_to_save_is_refused_before_any_change():
    model = tiny_bert()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"modules_to_save \['clasifier'\] matched no module.*classifier"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, modules_to_save=["clasifier"]))
    _assert_same(before, _snapshot(model))


def test_targets_all_inside_modules_to_save_name_modules_to_save():
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"\['q_proj'\] matched only modules inside modules_to_save \['self_attn'\] \(e\.g\. "
                                         r"'model\.layers\.0\.self_attn\.q_proj'\), which the adapter trains and saves whole, "
                                         r"so they cannot also get LoRA; drop them from target_modules or from modules_to_save"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["self_attn"]))
    _assert_same(before, _snapshot(model))
    with pytest.raises(ValueError, match=r"\['q_prj'\] matched no module"):  # a typo is still named as such
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_prj", "v_proj"], modules_to_save=["self_attn"]))


def test_enable_lora_on_an_embedding_or_conv_is_refused_naming_the_layer():
    """Fused slices exist on linear layers only; they were dropped silently and the whole layer adapted."""
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"enable_lora\['embed_tokens'\] matches 'model\.embed_tokens' \(Embedding\): "
                                         r"enable_lora .* applies to linear layers \(nn\.Linear, GPT-2 Conv1D\) only"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens"], enable_lora={"embed_tokens": [True, False]}))
    _assert_same(before, _snapshot(model))
    net = nn.Sequential(nn.Conv1d(4, 8, 3))
    before = _snapshot(net)
    with pytest.raises(ValueError, match=r"enable_lora\['0'\] matches '0' \(Conv1d\)"):
        lorakit.inject(net, lorakit.LoraConfig(r=2, target_modules=["0"], enable_lora={"0": [True, False]}))
    _assert_same(before, _snapshot(net))


def test_enable_lora_key_matching_no_targeted_module_is_refused_with_close_names():
    """A typo in an enable_lora key gave dense LoRA on the real c_attn; so did a key on a module not targeted."""
    model = tiny_gpt2()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"enable_lora key 'c_atn' matches none of the modules target_modules \['c_attn'\] "
                                         r"names in GPT2LMHeadModel.*Closest targeted names: \['c_attn'\]"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"], enable_lora={"c_atn": [True, False, True]}))
    with pytest.raises(ValueError, match=r"enable_lora key 'c_proj' matches none .*\['c_attn'\]"):  # defaults + a user key
        lorakit.inject(model, lorakit.LoraConfig(r=2, enable_lora={"c_proj": [True, False]}))
    _assert_same(before, _snapshot(model))


def test_enable_lora_keys_for_modules_filtered_out_by_layers_or_exclude_modules_are_accepted():
    """Only keys matching nothing the targets name are typos: the layers / exclude_modules filters come after."""
    fused = [True, False, True]
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2, target_modules=["c_attn"], layers=[0],
                                                           enable_lora={"c_attn": fused, r"h\.1\.attn\.c_attn": fused}))
    assert list(_adapted(model)) == ["transformer.h.0.attn.c_attn"]
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2, target_modules="all-linear", exclude_modules=["c_attn"],
                                                           enable_lora={"c_attn": fused}))
    assert "transformer.h.0.attn.c_attn" not in _adapted(model) and _adapted(model)


def test_injecting_twice_under_one_name_is_refused_and_another_name_works(input_ids):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    before = _snapshot(model)
    out = logits(model, input_ids)
    with pytest.raises(ValueError, match="adapter 'default' is already injected"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["v_proj"]))
    _assert_same(before, _snapshot(model))
    torch.testing.assert_close(logits(model, input_ids), out)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["v_proj"]), adapter="second")
    assert lorakit.list_adapters(model) == ["default", "second"]
    assert lorakit.active_adapters(model) == ["second"]


def test_config_must_be_a_lora_config():
    with pytest.raises(TypeError, match="LoraConfig"):
        lorakit.inject(tiny_llama(), {"r": 8})


def test_model_must_be_a_module_not_a_name(tmp_path):
    calls = [lambda m: lorakit.inject(m, lorakit.LoraConfig()), lambda m: lorakit.load_adapter(m, tmp_path),
             lorakit.merge, lorakit.unmerge, lambda m: lorakit.set_adapter(m, "a"), lambda m: lorakit.save_adapter(m, tmp_path),
             lambda m: lorakit.delete_adapter(m, "a"), lorakit.trainable_parameters, lorakit.summary, lorakit.merge_and_unload,
             lorakit.unload, lorakit.list_adapters, lorakit.active_adapters, lorakit.adapter_parameters, lorakit.adapter_state_dict,
             lorakit.init_adapters, lorakit.cast_base, lorakit.describe_precision, lambda m: lorakit.combine_adapters(m, {"a": 1.0}, "b"),
             lambda m: lorakit.analyze([tmp_path], m), lambda m: lorakit.disable_adapters(m).__enter__(),
             lambda m: lorakit.mixed_batch(m, ["a"]).__enter__(), lambda m: lorakit.finetune(m, None, [{"prompt": "a", "completion": "b"}])]
    for call in calls:
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str; load it first"):
            call("HuggingFaceTB/SmolLM2-135M")


def test_pattern_keys_that_match_no_adapted_layer_are_warned_about():
    cfg = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_prj": 2}, alpha_pattern={"v_proj": 8, "o_proj": 2})
    with pytest.warns(UserWarning, match=r"rank_pattern\['q_prj'\], alpha_pattern\['o_proj'\] matched no adapted layer"):
        model = lorakit.inject(tiny_llama(), cfg)
    assert {m.lora_specs["default"].r for m in model.modules() if isinstance(m, LoraLayer)} == {4}  # nothing changed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.inject(tiny_llama(), cfg.replace(rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 8}))
