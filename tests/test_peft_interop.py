"""Interop with the real `peft` package: its adapter folders load in lorakit, lorakit's load in PEFT,
with the same logits (fp32, max |Δ| ≤ 1e-5); plus the bad-input cases (pickles, unsupported fields)
and the merged model saved with transformers."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lorakit
from conftest import logits, tiny_bert, tiny_gpt2, tiny_llama
from lorakit.adapters import randomize_adapters
from lorakit.state import get_state, lora_layers

peft = pytest.importorskip("peft", reason="PEFT interop tests need the `peft` package: pip install -e '.[dev]'")

TOL = 1e-5


@dataclass
class Case:
    """One PEFT configuration on a tiny model; `lorakit_kwargs` is the same adapter in lorakit's terms."""

    build: Callable[[], nn.Module]
    peft_kwargs: dict[str, Any]
    lorakit_kwargs: dict[str, Any]

    def lorakit_config(self) -> lorakit.LoraConfig:
        return lorakit.LoraConfig(**copy.deepcopy(self.lorakit_kwargs))


def _both(build: Callable[[], nn.Module], r: int = 4, alpha: float = 8, **kw: Any) -> Case:
    """A case whose PEFT and lorakit configs differ only in field names."""
    names = {"layers_to_transform": "layers"}
    lk = {names.get(k, k): v for k, v in kw.items() if k not in ("task_type", "fan_in_fan_out")}
    return Case(build, dict(r=r, lora_alpha=alpha, **kw), dict(r=r, alpha=alpha, **lk))


QV = ["q_proj", "v_proj"]
CASES = {
    "llama_qv": _both(tiny_llama, target_modules=QV),
    "llama_all_linear": _both(tiny_llama, target_modules="all-linear"),
    "llama_all_linear_exclude": _both(tiny_llama, target_modules="all-linear", exclude_modules=["down_proj"]),
    "llama_regex_targets": _both(tiny_llama, target_modules=r".*\.layers\.1\..*(q_proj|up_proj)"),
    "llama_rslora": _both(tiny_llama, r=8, alpha=4, target_modules=QV, use_rslora=True),
    "llama_rank_alpha_pattern": _both(
        tiny_llama,
        target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"q_proj": 2, r"model\.layers\.1\.self_attn\.v_proj": 6},
        alpha_pattern={"v_proj": 3, "o_proj": 20},
    ),
    "llama_layers_to_transform": _both(tiny_llama, target_modules=QV, layers_to_transform=[1], layers_pattern="layers"),
    "llama_layers_no_pattern": _both(tiny_llama, target_modules=QV, layers_to_transform=0),
    "gpt2_conv1d_fan_in_fan_out": _both(tiny_gpt2, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    "llama_embedding": _both(tiny_llama, target_modules=["embed_tokens", "q_proj"]),
    "bert_modules_to_save": _both(tiny_bert, target_modules=["query", "value"], modules_to_save=["classifier"]),
    "bert_seq_cls_task": _both(tiny_bert, target_modules=["query", "value"], task_type="SEQ_CLS", modules_to_save=["classifier"]),
    "bert_lora_bias": _both(tiny_bert, target_modules=["query", "value"], lora_bias=True),
    "bert_bias_all": _both(tiny_bert, target_modules=["query", "value"], bias="all"),
    "bert_bias_lora_only": _both(tiny_bert, target_modules=["query", "value"], bias="lora_only"),
}
ADAPTER_NAMES = ["default", "task_b"]  # PEFT writes a non-default adapter into a subfolder of that name


def _randomize(params: list[torch.Tensor], seed: int = 0) -> None:
    """Fill every adapter tensor (A, B, biases, saved heads) with noise so that nothing is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _peft_model(case: Case, adapter: str) -> nn.Module:
    cfg = peft.LoraConfig(**copy.deepcopy(case.peft_kwargs))  # PEFT extends modules_to_save in place
    pm = peft.get_peft_model(case.build(), cfg, adapter_name=adapter)
    _randomize([p for p in pm.parameters() if p.requires_grad])
    return pm.eval()


def _lorakit_model(case: Case, adapter: str) -> nn.Module:
    model = lorakit.inject(case.build(), case.lorakit_config(), adapter=adapter)
    _randomize(list(lorakit.adapter_parameters(model, adapter).values()))
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("adapter", ADAPTER_NAMES)
@pytest.mark.parametrize("case_id", list(CASES))
def test_peft_adapter_loads_in_lorakit(case_id: str, adapter: str, tmp_path: Path, input_ids: torch.Tensor) -> None:
    case = CASES[case_id]
    pm = _peft_model(case, adapter)
    want = logits(pm, input_ids)
    pm.save_pretrained(tmp_path)
    folder = tmp_path if adapter == "default" else tmp_path / adapter
    base = case.build()
    assert _max_diff(logits(base, input_ids), want) > 1e-3  # the adapter really changes the model
    model = lorakit.load_adapter(base, folder, adapter=adapter)
    assert lorakit.list_adapters(model) == [adapter]
    assert _max_diff(logits(model, input_ids), want) <= TOL


@pytest.mark.parametrize("adapter", ADAPTER_NAMES)
@pytest.mark.parametrize("case_id", list(CASES))
def test_lorakit_adapter_loads_in_peft(case_id: str, adapter: str, tmp_path: Path, input_ids: torch.Tensor) -> None:
    case = CASES[case_id]
    model = _lorakit_model(case, adapter)
    want = logits(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(case.build(), tmp_path, adapter_name=adapter).eval()
    assert _max_diff(logits(pm, input_ids), want) <= TOL


def test_lorakit_fused_slices_load_in_peft(tmp_path: Path, input_ids: torch.Tensor) -> None:
    """GPT-2's fused c_attn adapted on q and v only (enable_lora) is written as block-structured dense LoRA."""
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=4, alpha=8, enable_lora={"c_attn": [True, False, True]}, target_modules=["c_attn"]))
    _randomize(list(lorakit.adapter_parameters(model).values()))
    want = logits(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    assert _max_diff(logits(pm, input_ids), want) <= TOL
    again = lorakit.load_adapter(tiny_gpt2(), tmp_path)  # and back, as fused slices again
    assert _max_diff(logits(again, input_ids), want) <= TOL


def test_peft_legacy_bin_loads(tmp_path: Path, input_ids: torch.Tensor) -> None:
    case = CASES["llama_qv"]
    pm = _peft_model(case, "default")
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    model = lorakit.load_adapter(case.build(), tmp_path)
    assert _max_diff(logits(model, input_ids), logits(pm, input_ids)) <= TOL


CALLS: list[str] = []


def _record_call() -> dict:
    CALLS.append("unpickled")
    return {}


class _Payload:
    """Unpickling this object runs `_record_call`: what a malicious ``.bin`` would do with os.system."""

    def __reduce__(self):
        return (_record_call, ())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert lorakit.list_adapters(model) == []


def test_bin_that_needs_full_unpickling_is_refused(tmp_path: Path) -> None:
    pm = _peft_model(CASES["llama_qv"], "default")
    pm.save_pretrained(tmp_path, safe_serialization=False)
    tensors = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    torch.save({**tensors, "extra": _Payload()}, tmp_path / "adapter_model.bin")
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match="needs full unpickling, which can run arbitrary code"):
        lorakit.load_adapter(model, tmp_path)
    assert CALLS == []  # the payload never ran
    _assert_unchanged(model, before)


def _peft_folder(tmp_path: Path, **overrides: Any) -> Path:
    pm = _peft_model(CASES["llama_qv"], "default")
    pm.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    fields = json.loads(config_file.read_text())
    fields.update(overrides)
    config_file.write_text(json.dumps(fields))
    return tmp_path


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"use_dora": True}, ["use_dora=True"]),
        ({"init_lora_weights": "pissa"}, ["init_lora_weights='pissa'", "rewrites the base weights"]),
        ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, ["init_lora_weights='loftq'"]),
        ({"init_lora_weights": "some_new_init"}, ["init_lora_weights='some_new_init'", "lorakit knows only"]),
        (
            {"use_dora": True, "layer_replication": [[0, 2], [1, 2]], "trainable_token_indices": [3, 4]},
            ["use_dora=True", "layer_replication=[[0, 2], [1, 2]]", "trainable_token_indices=[3, 4]"],
        ),
        ({"peft_type": "IA3"}, ["IA3 adapter", "LoRA adapters only"]),
        ({"enable_lora": [True, False, True], "merge_weights": False}, ["enable_lora=[True, False, True]", "PEFT 0.2"]),
    ],
)
def test_unsupported_peft_fields_are_refused_by_name(tmp_path: Path, overrides: dict, named: list[str]) -> None:
    folder = _peft_folder(tmp_path, **overrides)
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError) as err:
        lorakit.load_adapter(model, folder)
    for text in named:
        assert text in str(err.value)
    _assert_unchanged(model, before)


def test_unknown_harmless_fields_are_ignored_with_a_debug_log(
    tmp_path: Path, input_ids: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _peft_folder(tmp_path, field_from_peft_9000="whatever", qalora_group_size=32)
    want = logits(peft.PeftModel.from_pretrained(tiny_llama(), folder), input_ids)
    with caplog.at_level(logging.DEBUG, logger="lorakit.checkpoint"):
        model = lorakit.load_adapter(tiny_llama(), folder)
    assert "field_from_peft_9000='whatever'" in caplog.text and "qalora_group_size=32" in caplog.text
    assert _max_diff(logits(model, input_ids), want) <= TOL


def test_parent_folder_of_named_adapters_gets_a_pointer(tmp_path: Path) -> None:
    _peft_model(CASES["llama_qv"], "task_b").save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="task_b"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_embedding_of_another_vocabulary_is_refused(tmp_path: Path) -> None:
    """PEFT saves the embedding's base weight with an embedding LoRA; a model with another vocabulary must not take it."""
    _peft_model(CASES["llama_embedding"], "default").save_pretrained(tmp_path)
    model = tiny_llama(vocab=120)
    before = _state(model)
    with pytest.raises(ValueError, match="resize the model's embeddings"):
        lorakit.load_adapter(model, tmp_path)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("build, cfg", [
    (tiny_llama, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear")),
    (tiny_gpt2, lorakit.LoraConfig(r=4, alpha=8)),  # fused c_attn slices
    (tiny_bert, lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only")),
], ids=["llama", "gpt2_fused", "bert_head"])
def test_merged_model_saves_and_loads_with_plain_transformers(build, cfg, tmp_path: Path, input_ids: torch.Tensor) -> None:
    model = lorakit.inject(build(), cfg)
    _randomize(list(lorakit.adapter_parameters(model).values()))
    want = logits(model, input_ids)
    lorakit.save_adapter(model, tmp_path / "adapter")
    plain = lorakit.merge_and_unload(model)
    plain.save_pretrained(tmp_path / "merged")
    loaded = type(plain).from_pretrained(tmp_path / "merged").eval()
    assert _max_diff(logits(loaded, input_ids), want) <= TOL
    # PEFT merging the same adapter file into the same base gives the same weights
    peft_merged = peft.PeftModel.from_pretrained(build(), tmp_path / "adapter").merge_and_unload()
    ours, theirs = loaded.state_dict(), peft_merged.state_dict()
    assert set(ours) == set(theirs)
    assert max(_max_diff(ours[k], theirs[k]) for k in ours) <= 1e-6


def test_merge_into_tied_embeddings_is_refused_until_untied(tmp_path: Path, input_ids: torch.Tensor) -> None:
    """A LoRA on a tied embedding must not leak into the output head on merge (PEFT's merge does leak)."""
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    _randomize(list(lorakit.adapter_parameters(model).values()))
    want = logits(model, input_ids)
    before = _state(model)
    with pytest.raises(ValueError, match=r"tied to \['lm_head.weight'\].*Untie it first"):
        lorakit.merge_and_unload(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before) and lorakit.list_adapters(model) == ["default"]
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # the untying the error suggests
    model.config.tie_word_embeddings = False
    lorakit.merge_and_unload(model).save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert _max_diff(logits(loaded, input_ids), want) <= TOL


def test_peft_saved_embedding_base_weight_is_loaded_when_it_differs(tmp_path: Path, input_ids: torch.Tensor) -> None:
    """PEFT saves the embedding's own weight with an embedding LoRA (new tokens' rows); loading must apply it."""
    pm = _peft_model(CASES["llama_embedding"], "default")
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.base_layer.weight[100:].normal_()  # rows of "added tokens"
    pm.save_pretrained(tmp_path)
    want = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path), input_ids)
    assert _max_diff(want, logits(pm, input_ids)) <= TOL
    model = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert _max_diff(logits(model, input_ids), want) <= TOL
    lorakit.save_adapter(model, tmp_path / "again")  # the changed rows go back out with the adapter
    assert _max_diff(logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again"), input_ids), want) <= TOL


def test_peft_seq_cls_with_bias_all_loads(tmp_path: Path, input_ids: torch.Tensor) -> None:
    """PEFT's bias="all" also writes the head wrapper's inner biases (modules_to_save.bias, original_module.bias)."""
    torch.manual_seed(1)
    pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"], bias="all",
                                                          task_type="SEQ_CLS"))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.classifier.original_module.bias" in keys  # what made lorakit refuse the folder
    assert _max_diff(logits(lorakit.load_adapter(tiny_bert(), tmp_path), input_ids), logits(pm, input_ids)) <= TOL


def test_auto_peft_model_finds_the_base_lorakit_recorded(tmp_path: Path, input_ids: torch.Tensor) -> None:
    """A serving stack given only the adapter folder: `base_model_name_or_path` leads it to the base."""
    tiny_llama().save_pretrained(tmp_path / "base")
    model = type(tiny_llama()).from_pretrained(tmp_path / "base").eval()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    _randomize(list(lorakit.adapter_parameters(model).values()))
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    served = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert _max_diff(logits(served, input_ids), logits(model, input_ids)) <= TOL


@pytest.mark.slow
def test_real_smollm2_adapter_both_ways(tmp_path: Path) -> None:
    from lorakit.models import load_model

    try:  # not importorskip: the bundled package's own __init__ needs `llm`, which is installed without deps
        model, tok = load_model("smollm2-135m")
    except ModuleNotFoundError as e:
        pytest.skip(f"the bundled SmolLM2-135M is not installed: {e}")
    ids = tok("LoRA adapters from the PEFT ecosystem load in lorakit.", return_tensors="pt").input_ids
    pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_rslora=True))
    _randomize([p for p in pm.parameters() if p.requires_grad])
    pm.eval().save_pretrained(tmp_path / "peft")
    want = logits(pm, ids)
    ours = lorakit.load_adapter(load_model("smollm2-135m")[0].eval(), tmp_path / "peft")
    assert _max_diff(logits(ours, ids), want) <= TOL
    lorakit.save_adapter(ours, tmp_path / "lorakit")
    theirs = peft.PeftModel.from_pretrained(load_model("smollm2-135m")[0].eval(), tmp_path / "lorakit").eval()
    assert _max_diff(logits(theirs, ids), want) <= TOL


class _ConvNet(nn.Module):
    """A non-transformers model: Conv1d, Conv2d (stride 2), Embedding and Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv1d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, stride=2)
        self.emb, self.fc = nn.Embedding(10, 6), nn.Linear(6, 4)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.c1(x1).flatten(1), self.c2(x2).flatten(1), self.fc(self.emb(ids)).flatten(1)], dim=1)


@pytest.mark.parametrize("direction", ["peft_to_lorakit", "lorakit_to_peft"])
def test_conv_and_custom_modules(direction: str, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 9, 9, generator=gen), torch.randint(0, 10, (2, 5), generator=gen))
    targets = ["c1", "c2", "emb", "fc"]
    if direction == "peft_to_lorakit":
        source = peft.get_peft_model(_ConvNet(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        _randomize([p for p in source.parameters() if p.requires_grad])
        source.save_pretrained(tmp_path)
        loaded = lorakit.load_adapter(_ConvNet(), tmp_path)
    else:
        source = lorakit.inject(_ConvNet(), lorakit.LoraConfig(r=2, alpha=4, target_modules=targets))
        _randomize(list(lorakit.adapter_parameters(source).values()))
        lorakit.save_adapter(source, tmp_path)
        loaded = peft.PeftModel.from_pretrained(_ConvNet(), tmp_path)
    with torch.no_grad():
        want, got = source(*inputs), loaded(*inputs)
        assert _max_diff(want, _ConvNet()(*inputs)) > 1e-3
    assert _max_diff(got, want) <= TOL


def test_two_peft_adapters_on_one_model_switch_like_peft(tmp_path: Path, input_ids: torch.Tensor) -> None:
    for name, case_id in (("a", "llama_qv"), ("b", "llama_rank_alpha_pattern")):
        pm = _peft_model(CASES[case_id], "default")
        _randomize([p for p in pm.parameters() if p.requires_grad], seed=ord(name))
        pm.save_pretrained(tmp_path / name)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a").eval()
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    ours = lorakit.load_adapter(tiny_llama(), tmp_path / "a", adapter="a")
    lorakit.load_adapter(ours, tmp_path / "b", adapter="b")
    outs = {}
    for name in ("a", "b"):
        theirs.set_adapter(name)
        lorakit.set_adapter(ours, name)
        outs[name] = logits(ours, input_ids)
        assert _max_diff(outs[name], logits(theirs, input_ids)) <= TOL
    assert _max_diff(outs["a"], outs["b"]) > 1e-3


def test_combine_linear_matches_peft_add_weighted_adapter():
    """Same formula as PEFT's ``combination_type="linear"`` (plain scaling: PEFT's rsLoRA case keeps a √r factor)."""
    model = tiny_llama()
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8 if name == "a" else 2, target_modules=["q_proj", "v_proj"]), adapter=name)
    randomize_adapters(model, std=0.1, seed=1)
    lorakit.combine_adapters(model, {"a": 0.7, "b": -0.4}, name="lin", method="linear")
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    peft_model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for path, module in peft_model.base_model.model.named_modules():
            if path in layers:
                for name in ("a", "b"):
                    module.lora_A[name].weight.copy_(layers[path].lora_A[name])
                    module.lora_B[name].weight.copy_(layers[path].lora_B[name])
    peft_model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "lin", combination_type="linear")
    for path, module in peft_model.base_model.model.named_modules():
        if path in layers:
            torch.testing.assert_close(module.get_delta_weight("lin"), layers[path].delta_weight("lin"), atol=1e-6, rtol=1e-5)


# ---- configs PEFT must read as lorakit meant them (verifier round 2026-12-02) -----------------------

class _TopLevelBlocks(nn.Module):
    """Blocks at the top level of the path (``layers.1.q``): PEFT's layer-index regex wants a dot before ``layers``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(8, 8), "v": nn.Linear(8, 8)}) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block["v"](torch.tanh(block["q"](x)))
        return x


@pytest.mark.parametrize("build, cfg", [
    (tiny_llama, dict(target_modules=["down_proj"], alpha_pattern={r"model\.layers\.1\.mlp\.down_proj": 64, "down_proj": 4})),
    (tiny_llama, dict(target_modules=["down_proj"], rank_pattern={r"model\.layers\.1\.mlp\.down_proj": 8, "down_proj": 2})),
    (tiny_gpt2, dict(target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]}, alpha_pattern={"c_attn": 16})),
    (tiny_gpt2, dict(target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]}, rank_pattern={"c_attn": 2})),
    (tiny_llama, dict(target_modules="all-linear", layers=[1])),
    (tiny_llama, dict(target_modules=r".*\.q_proj", layers=[1])),
    (tiny_llama, dict(target_modules=["q_proj"], layers_pattern="layers")),
    (_TopLevelBlocks, dict(target_modules=["q"], layers=[1])),
], ids=["overlapping-alpha", "overlapping-rank", "fused+alpha", "fused+rank", "all-linear+layers", "regex+layers",
        "pattern-only", "top-level-blocks"])
def test_lorakit_configs_peft_reads_differently_or_refuses_now_load_with_equal_outputs(build, cfg, tmp_path):
    torch.manual_seed(0)
    model = lorakit.inject(build(), lorakit.LoraConfig(r=4, alpha=8, **cfg))
    _randomize(list(lorakit.adapter_parameters(model).values()))
    x = torch.randn(2, 8) if build is _TopLevelBlocks else torch.randint(0, 128, (2, 7))
    run = (lambda m: m(x).detach()) if build is _TopLevelBlocks else (lambda m: logits(m, x))
    want = run(model)
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    assert _max_diff(run(theirs), want) <= TOL
    again = lorakit.load_adapter(build(), tmp_path)
    assert _max_diff(run(again), want) <= TOL


def test_peft_modules_to_save_plain_suffix_rule_is_followed(tmp_path, input_ids):
    """PEFT saves every module whose path ends with the name ("norm" also takes input_layernorm)."""
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"]))
    _randomize([p for p in pm.parameters() if p.requires_grad])
    want = logits(pm.eval(), input_ids)
    pm.save_pretrained(tmp_path)
    model = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert _max_diff(logits(model, input_ids), want) <= TOL


def test_adapter_keys_with_the_adapter_name_in_them_load(tmp_path, input_ids):
    from safetensors.torch import load_file, save_file

    pm = _peft_model(CASES["llama_qv"], "default")
    want = logits(pm, input_ids)
    pm.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    save_file({k.replace(".weight", ".default.weight"): v for k, v in load_file(file).items()}, file)
    model = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert _max_diff(logits(model, input_ids), want) <= TOL


def test_peft_ensure_weight_tying_with_saved_modules_is_refused_by_name(tmp_path):
    """PEFT then ties the saved copy of wte to lm_head; lorakit keeps copies untied, so it refuses, not misloads."""
    pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                          modules_to_save=["lm_head"], ensure_weight_tying=True))
    pm.save_pretrained(tmp_path)
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="ensure_weight_tying=True with modules_to_save"):
        lorakit.load_adapter(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cfg", [
    dict(target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]}, alpha_pattern={"c_attn": 16}),
    dict(target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]}, rank_pattern={r"h\.1\.attn\.c_attn": 2}),
    dict(target_modules=["c_attn", "c_proj"], rank_pattern={"attn.c_proj": 2, "c_proj": 8}, alpha_pattern={"c_proj": 4}),
], ids=["fused+alpha", "fused+rank", "overlapping-user-keys"])
def test_lorakit_pattern_keys_mean_the_same_in_any_order(cfg, tmp_path):
    """PEFT's save_pretrained re-sorts the pattern keys: the file must not depend on their order."""
    torch.manual_seed(0)
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=4, alpha=8, **cfg))
    _randomize(list(lorakit.adapter_parameters(model).values()))
    ids = torch.randint(0, 128, (2, 7))
    want = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("rank_pattern", "alpha_pattern"):
        fields[key] = dict(reversed(list(fields[key].items())))
    (tmp_path / "adapter_config.json").write_text(json.dumps(fields))
    assert _max_diff(logits(peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval(), ids), want) <= TOL
    assert _max_diff(logits(lorakit.load_adapter(tiny_gpt2(), tmp_path), ids), want) <= TOL


def test_a_folder_written_before_exact_pattern_keys_still_matches_its_own_metadata(tmp_path, caplog):
    """Older files list layers_to_transform and the user's keys; lorakit must still recover its fused slices."""
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=4, alpha=8, target_modules=["c_attn"], layers=[1],
                                                          enable_lora={"c_attn": [True, False, True]}))
    lorakit.save_adapter(model, tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    fields.update(target_modules=["c_attn"], layers_to_transform=[1], layers_pattern=None)  # the old way of writing it
    (tmp_path / "adapter_config.json").write_text(json.dumps(fields))
    with caplog.at_level(logging.WARNING):
        loaded = lorakit.load_adapter(tiny_gpt2(), tmp_path)
    assert "differs" not in caplog.text
    assert loaded.transformer.h[1].attn.c_attn.lora_specs["default"].enabled == (True, False, True)


def test_lorakit_all_linear_on_a_classifier_loads_in_peft_on_the_same_modules(tmp_path, input_ids):
    """PEFT's "all-linear" without a task type also wraps the classification head, which lorakit's leaves alone:
    the file names the adapted modules, so PEFT adapts exactly those, and lorakit reads back its own config."""
    model = lorakit.inject(tiny_bert(), lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    _randomize(list(lorakit.adapter_parameters(model).values()))
    want = logits(model, input_ids)
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    wrapped = {p.removeprefix("base_model.model.") for p, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == {p for p, _ in lora_layers(model)} and "classifier" not in wrapped
    assert _max_diff(logits(theirs, input_ids), want) <= TOL
    config = get_state(model).adapters["default"].config
    assert lorakit.read_adapter(tmp_path)[2] == config and config.target_modules == "all-linear"
    again = lorakit.load_adapter(tiny_bert(), tmp_path)
    assert get_state(again).adapters["default"].config == config
    assert _max_diff(logits(again, input_ids), want) <= TOL


def _resized_llama(folder: Path) -> nn.Module:
    """The tiny LLaMA saved at `folder` with 8 added tokens (vocabulary 128 -> 136), their rows fixed."""
    model = type(tiny_llama()).from_pretrained(folder).eval()
    model.resize_token_embeddings(136, mean_resizing=False)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.model.embed_tokens.weight[128:] = torch.randn(8, 32, generator=gen) * 0.02
        model.lm_head.weight[128:] = torch.randn(8, 32, generator=gen) * 0.02
    return model


def test_peft_adapter_on_a_resized_vocabulary_loads_with_its_embedding_layers(tmp_path: Path) -> None:
    """LoRA on q,v of a model with added tokens: PEFT's default save also writes the resized embed_tokens and
    lm_head under their plain names (no LoRA there); lorakit loads them as PEFT does, and writes them back."""
    tiny_llama().save_pretrained(tmp_path / "base")  # PEFT compares the vocabulary with the base's config.json
    pm = peft.get_peft_model(_resized_llama(tmp_path / "base"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV))
    _randomize([p for p in pm.parameters() if p.requires_grad])
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.weight[128:] += 0.5  # the new tokens' rows, trained
    pm.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(keys)
    ids = torch.tensor([[3, 130, 7, 135, 9], [4, 128, 131, 8, 2]])  # added tokens among them
    want = logits(peft.PeftModel.from_pretrained(_resized_llama(tmp_path / "base"), tmp_path / "peft"), ids)
    model = lorakit.load_adapter(_resized_llama(tmp_path / "base"), tmp_path / "peft")
    assert _max_diff(logits(model, ids), want) <= TOL
    assert get_state(model).adapters["default"].base_params == ["model.embed_tokens.weight"]  # lm_head: as the model's
    lorakit.save_adapter(model, tmp_path / "again")
    theirs = peft.PeftModel.from_pretrained(_resized_llama(tmp_path / "base"), tmp_path / "again")
    assert _max_diff(logits(theirs, ids), want) <= TOL
    lorakit.delete_adapter(model, "default")  # the model's own embedding comes back
    own = _resized_llama(tmp_path / "base")
    assert torch.equal(model.model.embed_tokens.weight, own.model.embed_tokens.weight)
    assert _max_diff(logits(model, ids), logits(own, ids)) == 0


@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "wte"]])
def test_peft_save_embedding_layers_on_tied_gpt2_loads_and_round_trips(targets: list[str], tmp_path: Path, input_ids) -> None:
    """save_embedding_layers=True on GPT-2 writes transformer.wte's weight (base_layer when wte has LoRA) and the
    tied lm_head.weight: one tensor in the model, loaded once, tied still, and put back on delete."""
    pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True))
    _randomize([p for p in pm.parameters() if p.requires_grad])
    wte = pm.base_model.model.transformer.wte
    with torch.no_grad():
        getattr(wte, "base_layer", wte).weight[100:] += 0.5
    pm.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    want = logits(peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft"), input_ids)
    model = lorakit.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert _max_diff(logits(model, input_ids), want) <= TOL
    assert model.lm_head.weight is model.transformer.wte.weight
    lorakit.save_adapter(model, tmp_path / "again")
    assert _max_diff(logits(peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "again"), input_ids), want) <= TOL
    lorakit.delete_adapter(model, "default")
    assert torch.equal(model.lm_head.weight, tiny_gpt2().lm_head.weight)


class _OddNames(nn.Module):
    """Layers under nn.ModuleDict keys with regex characters in them (legal module names)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleDict({"q+v": nn.Linear(8, 8), "o": nn.Linear(8, 8), "qqv": nn.Linear(8, 8)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks["qqv"](self.blocks["o"](self.blocks["q+v"](x)))


def test_per_layer_rank_keys_of_module_names_with_regex_characters_load_in_peft(tmp_path: Path) -> None:
    """Each layer's rank/alpha key is its path regex-escaped: `blocks\\.q+v` would match neither "q+v" in PEFT nor
    only it ("qqv")."""
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q+v", "o", "qqv"], rank_pattern={r"q\+v": 2},
                             alpha_pattern={r"q\+v": 3})
    model = lorakit.inject(_OddNames(), cfg)
    _randomize(list(lorakit.adapter_parameters(model).values()))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    lorakit.save_adapter(model, tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["rank_pattern"] == {r"blocks\.q\+v": 2} and fields["alpha_pattern"] == {r"blocks\.q\+v": 3}
    theirs = peft.PeftModel.from_pretrained(_OddNames(), tmp_path).eval()
    with torch.no_grad():
        assert _max_diff(theirs(x), want) <= TOL
        assert _max_diff(lorakit.load_adapter(_OddNames(), tmp_path)(x), want) <= TOL


def test_a_peft_model_is_refused_by_lorakit_with_the_way_to_go_on(tmp_path: Path) -> None:
    base = tiny_llama()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for call in (lambda: lorakit.inject(pm, lorakit.LoraConfig(r=4)), lambda: lorakit.load_adapter(pm, tmp_path),
                 lambda: lorakit.finetune(pm, None, [{"prompt": "a", "completion": "b"}])):
        with pytest.raises(ValueError, match=r"carries PEFT adapters .*lorakit.load_adapter\(base_model, folder\)"):
            call()
        assert get_state(pm, required=False) is None and get_state(base, required=False) is None
