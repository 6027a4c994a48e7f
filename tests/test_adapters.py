"""Adapters on a model: counts, summary, state dicts in PEFT's keys, named adapters, delete, disable."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lorakit
from conftest import logits, tiny_bert, tiny_gpt2, tiny_llama
from lorakit.adapters import randomize_adapters
from lorakit.layers import LoraLayer


def _two_adapters() -> nn.Module:
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["v_proj", "o_proj"]), adapter="b")
    randomize_adapters(model, std=0.1)
    return model


def test_trainable_parameters_counts_tied_tensors_once():
    model = tiny_gpt2()  # lm_head.weight is wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert lorakit.trainable_parameters(model) == (sum(unique.values()), sum(unique.values()))
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    assert lorakit.trainable_parameters(model)[1] == sum(unique.values()) + 2 * 2 * 2 * (32 + 32)


def test_summary_lists_module_shape_r_alpha_params_and_totals():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj"],
                                                            rank_pattern={"v_proj": 2}))
    text = lorakit.summary(model)
    header = text.splitlines()[0].split()
    for column in ("module", "shape", "r", "alpha", "params"):
        assert column in header
    row = next(line for line in text.splitlines() if line.startswith("model.layers.0.self_attn.v_proj"))
    assert re.search(r"16×32\s+default\s+2\s+16\s+96\b", row)  # 2·(32 + 16) = 96
    row = next(line for line in text.splitlines() if line.startswith("model.layers.1.self_attn.q_proj"))
    assert re.search(r"32×32\s+default\s+4\s+16\s+256\b", row)
    trainable, total = lorakit.trainable_parameters(model)
    assert trainable == 2 * (256 + 96)
    assert f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)" in text
    assert "LoRA layers: 4" in text


def test_summary_marks_fused_slices_and_merged_state():
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2))
    assert "Conv1D[x-x]" in lorakit.summary(model)
    lorakit.merge(model)
    assert all(line.endswith("merged") for line in lorakit.summary(model).splitlines()[2:4])


def test_adapter_state_dict_uses_peft_keys_and_holds_only_adapter_tensors():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    keys = sorted(lorakit.adapter_state_dict(model))
    assert keys == sorted(
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{m}.weight" for i in (0, 1) for m in ("A", "B")
    )
    sd = lorakit.adapter_state_dict(model)
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 2)


def test_adapter_state_dict_covers_embeddings_fused_slices_saved_modules_and_biases():
    emb = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["embed_tokens"]))
    assert sorted(lorakit.adapter_state_dict(emb)) == [
        "base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B"
    ]
    gpt2 = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2))
    B = lorakit.adapter_state_dict(gpt2)["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert B.shape == (96, 4)  # dense, block-structured: q rows use A's first r rows, v rows the last r
    bert = lorakit.inject(tiny_bert(), lorakit.LoraConfig(r=2, modules_to_save=["classifier"], bias="all", lora_bias=True))
    sd = lorakit.adapter_state_dict(bert)
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(sd)
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.bias" in sd
    assert "base_model.model.bert.encoder.layer.0.output.LayerNorm.bias" in sd  # bias="all"
    trainable = {id(p) for p in bert.parameters() if p.requires_grad}
    assert sum(t.numel() for t in sd.values()) == sum(p.numel() for p in bert.parameters() if id(p) in trainable)


def test_adapter_parameters_are_exactly_the_trainable_tensors():
    model = lorakit.inject(tiny_bert(), lorakit.LoraConfig(r=2, modules_to_save=["classifier"], bias="lora_only"))
    params = lorakit.adapter_parameters(model)
    assert {id(p) for p in params.values()} == {id(p) for p in model.parameters() if p.requires_grad}
    assert "bert.encoder.layer.0.attention.self.query.lora_A.default" in params
    assert "bert.encoder.layer.0.attention.self.query.bias" in params


def test_named_adapters_switch_and_only_the_active_one_trains(input_ids):
    model = _two_adapters()
    assert lorakit.list_adapters(model) == ["a", "b"] and lorakit.active_adapters(model) == ["b"]
    out_b = logits(model, input_ids)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"b"}
    lorakit.set_adapter(model, "a")
    out_a = logits(model, input_ids)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"a"}
    lorakit.set_adapter(model, ["a", "b"])  # updates add
    both = logits(model, input_ids)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, input_ids), both, atol=1e-5, rtol=0)
    lorakit.set_adapter(model, "b")  # a merged model stays merged, with the new adapter
    torch.testing.assert_close(logits(model, input_ids), out_b, atol=1e-5, rtol=0)
    assert all(m.merged_adapters in ([], ["b"]) for m in model.modules() if isinstance(m, LoraLayer))
    with pytest.raises(ValueError, match=r"no adapter named \['c'\]; this model has \['a', 'b'\]"):
        lorakit.set_adapter(model, "c")


def test_delete_adapter_frees_it_and_keeps_the_other(input_ids):
    model = _two_adapters()
    lorakit.set_adapter(model, "a")
    out_a = logits(model, input_ids)
    lorakit.delete_adapter(model, "b")
    assert lorakit.list_adapters(model) == ["a"] and lorakit.active_adapters(model) == ["a"]
    assert not any(".b" in n for n, _ in model.named_parameters())
    assert not hasattr(model.model.layers[0].self_attn.o_proj, "lora_A")  # o_proj had only b: plain again
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    torch.testing.assert_close(logits(model, input_ids), out_a)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"a"}


def test_deleting_the_last_adapter_gives_back_the_plain_model(input_ids):
    base_model = tiny_llama()
    base = logits(base_model, input_ids)
    classes = [type(m) for m in base_model.modules()]
    model = _two_adapters()
    lorakit.merge(model)
    lorakit.delete_adapter(model, "b")
    lorakit.delete_adapter(model, "a")
    assert [type(m) for m in model.modules()] == classes
    assert "_lorakit" not in model.__dict__ and all(p.requires_grad for p in model.parameters())
    assert list(model.state_dict()) == list(base_model.state_dict())
    torch.testing.assert_close(logits(model, input_ids), base, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="carries no lorakit adapter"):
        lorakit.delete_adapter(model, "a")


def test_delete_a_merged_adapter_unmerges_it_first(input_ids):
    model = _two_adapters()
    lorakit.set_adapter(model, "a")
    out_a = logits(model, input_ids)
    lorakit.set_adapter(model, ["a", "b"])
    lorakit.merge(model)
    lorakit.delete_adapter(model, "b")
    torch.testing.assert_close(logits(model, input_ids), out_a, atol=1e-5, rtol=0)


def test_deleting_the_merged_active_adapter_keeps_the_model_merged(input_ids):
    model = _two_adapters()
    lorakit.set_adapter(model, "b")
    out_b = logits(model, input_ids)
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    lorakit.delete_adapter(model, "a")
    assert lorakit.active_adapters(model) == []
    lorakit.set_adapter(model, "b")  # merged serving goes on: b is merged, not run beside the base
    v = model.model.layers[0].self_attn.v_proj
    assert v.merged_adapters == ["b"]
    torch.testing.assert_close(logits(model, input_ids), out_b, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    lorakit.set_adapter(model, "b")
    assert v.merged_adapters == []


def test_a_loaded_adapter_is_merged_after_the_merged_one_was_deleted(tmp_path, input_ids):
    model = _two_adapters()
    lorakit.set_adapter(model, "b")
    lorakit.save_adapter(model, tmp_path / "b", adapter="b")
    out_b = logits(model, input_ids)
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    lorakit.delete_adapter(model, "a")  # swap the served adapter: delete the old, load the new ("b" stays loaded)
    lorakit.load_adapter(model, tmp_path / "b", adapter="new")
    assert model.model.layers[0].self_attn.v_proj.merged_adapters == ["new"]
    torch.testing.assert_close(logits(model, input_ids), out_b, atol=1e-5, rtol=0)
    lorakit.delete_adapter(model, "b")
    lorakit.delete_adapter(model, "new")  # the last one: the plain model again, merged mode and all
    lorakit.load_adapter(model, tmp_path / "b", adapter="new")
    assert model.model.layers[0].self_attn.v_proj.merged_adapters == []


def test_delete_unknown_adapter_names_the_choices():
    model = _two_adapters()
    with pytest.raises(ValueError, match=r"no adapter named 'x'; this model has \['a', 'b'\]"):
        lorakit.delete_adapter(model, "x")


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapters_computes_the_base_and_restores(merged, input_ids):
    base = logits(tiny_llama(), input_ids)
    model = _two_adapters()
    if merged:
        lorakit.merge(model)
    out = logits(model, input_ids)
    merged_before = [list(m.merged_adapters) for m in model.modules() if isinstance(m, LoraLayer)]
    assert any(merged_before) == merged
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model, input_ids), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, input_ids), out, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError), lorakit.disable_adapters(model):
        raise RuntimeError("inside")
    torch.testing.assert_close(logits(model, input_ids), out, atol=1e-5, rtol=0)
    assert [m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer)] == merged_before


def test_resolve_needs_a_name_when_several_adapters_are_active():
    model = _two_adapters()
    lorakit.set_adapter(model, ["a", "b"])
    with pytest.raises(ValueError, match="2 adapters are active"):
        lorakit.adapter_state_dict(model)
    assert lorakit.adapter_state_dict(model, "a")


# ---- modules_to_save: each adapter its own copy -------------------------------------------------

def _head_adapter(model: nn.Module, name: str, seed: int) -> None:
    """Adapter `name` with LoRA on query/value and its own trained classifier head (random values)."""
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]),
                   adapter=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _reference(name: str, seed: int, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of adapter `name` alone on a fresh model."""
    model = tiny_bert()
    _head_adapter(model, name, seed)
    return logits(model, input_ids)


def test_each_adapter_keeps_its_own_saved_head_and_delete_restores_the_base(input_ids):
    base_model = tiny_bert()
    base, base_keys = logits(base_model, input_ids), list(base_model.state_dict())
    ref_a, ref_b = _reference("a", 1, input_ids), _reference("b", 2, input_ids)
    model = tiny_bert()
    _head_adapter(model, "a", 1)
    _head_adapter(model, "b", 2)  # b's head must not overwrite a's, nor the base head
    torch.testing.assert_close(logits(model, input_ids), ref_b)
    lorakit.set_adapter(model, "a")
    torch.testing.assert_close(logits(model, input_ids), ref_a)
    assert {n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n} == {
        "classifier.modules_to_save.a.weight", "classifier.modules_to_save.a.bias"}
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model, input_ids), base)
    lorakit.delete_adapter(model, "a")
    torch.testing.assert_close(logits(model, input_ids), base)  # no adapter active now
    lorakit.set_adapter(model, "b")
    torch.testing.assert_close(logits(model, input_ids), ref_b)
    lorakit.delete_adapter(model, "b")
    assert type(model.classifier) is nn.Linear and list(model.state_dict()) == base_keys
    torch.testing.assert_close(logits(model, input_ids), base)


def test_loaded_saved_head_goes_to_the_adapters_copy(tmp_path, input_ids):
    trained = tiny_bert()
    _head_adapter(trained, "b", 2)
    lorakit.save_adapter(trained, tmp_path)
    base = logits(tiny_bert(), input_ids)
    model = tiny_bert()
    _head_adapter(model, "a", 1)
    out_a = logits(model, input_ids)
    lorakit.load_adapter(model, tmp_path, adapter="b")
    torch.testing.assert_close(logits(model, input_ids), logits(trained, input_ids))
    lorakit.set_adapter(model, "a")
    torch.testing.assert_close(logits(model, input_ids), out_a)
    lorakit.delete_adapter(model, "b")
    lorakit.delete_adapter(model, "a")
    torch.testing.assert_close(logits(model, input_ids), base)


def test_two_active_adapters_with_copies_of_one_head_are_refused(input_ids):
    model = tiny_bert()
    _head_adapter(model, "a", 1)
    _head_adapter(model, "b", 2)
    before = logits(model, input_ids)
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\] each have their own copy of 'classifier'"):
        lorakit.set_adapter(model, ["a", "b"])
    assert lorakit.active_adapters(model) == ["b"]
    torch.testing.assert_close(logits(model, input_ids), before)


def test_merge_and_unload_keeps_the_trained_head_and_unload_the_base(input_ids):
    base = logits(tiny_bert(), input_ids)
    for strip, expect in ((lorakit.merge_and_unload, "tuned"), (lorakit.unload, "base")):
        model = tiny_bert()
        _head_adapter(model, "a", 1)
        tuned = logits(model, input_ids)
        strip(model)
        assert type(model.classifier) is nn.Linear
        torch.testing.assert_close(logits(model, input_ids), tuned if expect == "tuned" else base, atol=1e-5, rtol=0)


def test_tie_weights_keeps_the_base_head_tied_and_the_trained_copy_its_own(input_ids):
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    copy = model.lm_head.modules_to_save["default"]
    with torch.no_grad():
        copy.weight.add_(0.5)  # "trained"
    tuned = logits(model, input_ids)
    model.tie_weights()  # transformers calls this, e.g. in resize_token_embeddings; it raised KeyError on the wrapper
    assert model.lm_head.original_module.weight is model.model.embed_tokens.weight
    assert model.lm_head.modules_to_save["default"] is copy and copy.weight.requires_grad
    torch.testing.assert_close(logits(model, input_ids), tuned, atol=0, rtol=0)


def test_adapters_that_train_base_biases_do_not_share_a_model(input_ids):
    model = tiny_bert()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.inject(model, lorakit.LoraConfig(r=2, bias="all"), adapter="a")
    with torch.no_grad():
        model.bert.pooler.dense.bias.add_(1.0)  # "trained"
    with pytest.raises(ValueError, match=r"adapter 'a' trains the base model's biases"):
        lorakit.inject(model, lorakit.LoraConfig(r=2), adapter="b")
    assert lorakit.list_adapters(model) == ["a"]
    lorakit.delete_adapter(model, "a")  # the biases it trained go back to their base values
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    lorakit.inject(model, lorakit.LoraConfig(r=2), adapter="b")
    with pytest.raises(ValueError, match=r"adapter 'c' trains biases \(bias='lora_only'\).*\['b'\]"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, bias="lora_only"), adapter="c")
    assert lorakit.list_adapters(model) == ["b"]


# ---- merged models: swaps check everything first, new adapters train unmerged ---------------

def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_merged_swap_onto_a_tied_embedding_adapter_is_refused_unchanged(input_ids):
    model = tiny_gpt2()  # lm_head.weight is wte.weight
    lorakit.inject(model, lorakit.LoraConfig(r=2), adapter="attn")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["wte"]), adapter="emb")
    randomize_adapters(model, std=0.1)
    lorakit.set_adapter(model, "attn")
    lorakit.merge(model)
    before, out = _weights(model), logits(model, input_ids)
    with pytest.raises(ValueError, match=r"cannot merge into 'transformer.wte': its weight is tied"):
        lorakit.set_adapter(model, "emb")
    assert lorakit.active_adapters(model) == ["attn"]
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert all(m.merged_adapters == ["attn"] for m in model.modules() if isinstance(m, LoraLayer) and "attn" in m.lora_specs)
    torch.testing.assert_close(logits(model, input_ids), out)


def test_merged_swap_that_fails_on_a_later_layer_changes_no_layer(input_ids):
    model = tiny_llama()  # no base biases: a lora_bias cannot be merged
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj"], lora_bias=True), adapter="b")
    randomize_adapters(model, std=0.1)
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    before, out = _weights(model), logits(model, input_ids)
    with pytest.raises(ValueError, match="has a lora_bias but no base bias"):
        lorakit.set_adapter(model, "b")
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert all(m.merged_adapters == ["a"] and m.active_adapters == ["a"]
               for m in model.modules() if isinstance(m, LoraLayer) and "a" in m.lora_specs)
    torch.testing.assert_close(logits(model, input_ids), out)


def test_inject_into_a_merged_model_trains_the_new_adapter_unmerged(input_ids):
    base = logits(tiny_llama(), input_ids)
    model = _two_adapters()
    lorakit.merge(model)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="new")
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))
    assert lorakit.active_adapters(model) == ["new"]
    torch.testing.assert_close(logits(model, input_ids), base, atol=1e-5, rtol=0)  # B = 0: the base model
    model(input_ids).logits.pow(2).mean().backward()
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_B["new"].grad is not None and q.lora_B["new"].grad.abs().sum() > 0
    assert q.weight.grad is None


def test_a_module_cannot_be_both_saved_whole_and_adapted(input_ids):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear"), adapter="a")
    before = logits(model, input_ids)
    with pytest.raises(ValueError, match=r"saves 'model.layers.1.mlp' whole.*adapters \['a'\] put LoRA inside it"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["layers.1.mlp"]), adapter="b")
    assert lorakit.list_adapters(model) == ["a"] and not any("modules_to_save" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, input_ids), before)
    other = tiny_llama()
    lorakit.inject(other, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), adapter="b")
    with pytest.raises(ValueError, match=r"target 'lm_head' is saved whole by adapters \['b'\]"):
        lorakit.inject(other, lorakit.LoraConfig(r=2, target_modules=["lm_head"]), adapter="c")


@pytest.mark.parametrize("name", ["v1.2", "", 3])
def test_adapter_names_that_cannot_key_a_module_dict_are_refused(name):
    model = tiny_llama()
    with pytest.raises(ValueError, match="adapter name must be a non-empty string without '.'"):
        lorakit.inject(model, lorakit.LoraConfig(r=2), adapter=name)
    assert "_lorakit" not in model.__dict__


def test_set_adapter_none_says_how_to_get_the_base():
    model = _two_adapters()
    with pytest.raises(ValueError, match=r"adapter name or a list of names, got None.*disable_adapters"):
        lorakit.set_adapter(model, None)
    active = lorakit.active_adapters(model)
    with pytest.raises(ValueError, match=r"empty list.*disable_adapters"):
        lorakit.set_adapter(model, [])
    assert lorakit.active_adapters(model) == active


def test_disable_adapters_gives_trained_biases_their_base_values(input_ids):
    base = logits(tiny_bert(), input_ids)
    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(r=2, bias="all"), adapter="a")
    with torch.no_grad():
        model.bert.pooler.dense.bias.add_(1.0)  # "trained"
    tuned = logits(model, input_ids)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model, input_ids), base)
    torch.testing.assert_close(logits(model, input_ids), tuned)


def _embedding_file(folder, shift: float | None, seed: int = 0, targets: tuple = ("embed_tokens", "q_proj")):
    """An adapter folder on embed_tokens (and q_proj); with `shift`, it also carries a base embedding of E0 + shift
    (as PEFT saves a resized vocabulary), so loading it changes the base model's own weight."""
    from safetensors.torch import load_file, save_file

    import lorakit.checkpoint as ckpt

    source = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=list(targets)))
    randomize_adapters(source, std=0.1, seed=seed)
    lorakit.save_adapter(source, folder)
    if shift is not None:
        tensors = load_file(folder / ckpt.WEIGHTS_NAME)
        tensors["base_model.model.model.embed_tokens.base_layer.weight"] = tiny_llama().model.embed_tokens.weight.detach() + shift
        save_file(tensors, folder / ckpt.WEIGHTS_NAME)
    return folder


def test_a_second_adapter_that_would_change_a_base_weight_another_set_is_refused(tmp_path):
    model, base = tiny_llama(), tiny_llama()
    lorakit.load_adapter(model, _embedding_file(tmp_path / "a", 0.5), adapter="a")
    loaded = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*'a'"):
        lorakit.load_adapter(model, _embedding_file(tmp_path / "b", 0.25, seed=1), adapter="b")
    assert lorakit.list_adapters(model) == ["a"] and torch.equal(model.model.embed_tokens.weight, loaded)
    lorakit.delete_adapter(model, "a")
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_a_base_weight_two_adapters_bring_alike_stays_until_the_last_of_them_goes(tmp_path):
    model, base = tiny_llama(), tiny_llama()
    lorakit.load_adapter(model, _embedding_file(tmp_path / "a", 0.5), adapter="a")
    loaded = model.model.embed_tokens.weight.detach().clone()
    lorakit.load_adapter(model, _embedding_file(tmp_path / "b", 0.5, seed=1), adapter="b")
    lorakit.delete_adapter(model, "a")
    assert torch.equal(model.model.embed_tokens.weight, loaded)  # "b" was trained on it too
    lorakit.delete_adapter(model, "b")
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_loading_a_base_weight_into_a_merged_layer_records_its_unmerged_value(tmp_path):
    model, base = tiny_llama(), tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens"]), adapter="x")
    randomize_adapters(model, std=0.1, seed=3)
    lorakit.merge(model)
    lorakit.load_adapter(model, _embedding_file(tmp_path / "a", 0.5), adapter="a")
    lorakit.delete_adapter(model, "a")
    lorakit.unmerge(model)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_a_base_weight_put_back_under_a_merged_adapter_lands_in_its_unmerged_value(tmp_path, input_ids):
    model, base = tiny_llama(), tiny_llama()
    lorakit.load_adapter(model, _embedding_file(tmp_path / "a", 0.5), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens"]), adapter="x")
    randomize_adapters(model, std=0.1, seed=3)
    lorakit.set_adapter(model, "x")
    lorakit.merge(model)
    lorakit.delete_adapter(model, "a")
    merged = logits(model, input_ids)
    lorakit.unmerge(model)
    torch.testing.assert_close(logits(model, input_ids), merged, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_a_base_weight_of_a_tied_head_is_saved_and_put_back(tmp_path, input_ids):
    from safetensors.torch import load_file, save_file

    import lorakit.checkpoint as ckpt

    source = lorakit.inject(tiny_llama(tie=True), lorakit.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    randomize_adapters(source, std=0.1)
    folder = lorakit.save_adapter(source, tmp_path / "a")
    tensors = load_file(folder / ckpt.WEIGHTS_NAME)
    tensors["base_model.model.lm_head.base_layer.weight"] = tiny_llama(tie=True).lm_head.weight.detach() + 0.5
    save_file(tensors, folder / ckpt.WEIGHTS_NAME)
    model, base = lorakit.load_adapter(tiny_llama(tie=True), folder), tiny_llama(tie=True)
    saved = lorakit.adapter_state_dict(model)
    assert torch.equal(saved["base_model.model.lm_head.base_layer.weight"], tensors["base_model.model.lm_head.base_layer.weight"])
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model, input_ids), logits(base, input_ids), rtol=0, atol=0)
    lorakit.delete_adapter(model, "default")
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)


def test_mixed_batch_refuses_base_rows_beside_an_adapter_that_loaded_base_weights(tmp_path, input_ids):
    model = tiny_llama()
    lorakit.load_adapter(model, _embedding_file(tmp_path / "a", 0.5), adapter="a")
    with pytest.raises(ValueError, match="base model's"), lorakit.mixed_batch(model, ["a", None]):
        pass
    with lorakit.mixed_batch(model, ["a", "a"]):
        model(input_ids)


def test_saving_inside_disable_adapters_is_refused(tmp_path):
    model = lorakit.inject(tiny_bert(), lorakit.LoraConfig(r=2, bias="all"))
    with lorakit.disable_adapters(model), pytest.raises(ValueError, match="disable_adapters"):
        lorakit.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_flags_a_user_set_outside_the_adapters_survive_set_adapter_combine_and_delete():
    """As PEFT: set_adapter toggles only adapter tensors; inject freezes the base again; combine and delete touch
    no other adapter's flags."""
    model = _two_adapters()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["k_proj"]), adapter="c")
    model.model.norm.weight.requires_grad_(True)
    lorakit.set_adapter(model, "b")
    assert model.model.norm.weight.requires_grad
    frozen_b = list(lorakit.adapter_parameters(model, "b").values())
    for p in frozen_b:
        p.requires_grad_(False)
    lorakit.combine_adapters(model, {"a": 0.5, "b": 0.5}, name="ab")
    lorakit.delete_adapter(model, "c")
    assert model.model.norm.weight.requires_grad and not any(p.requires_grad for p in frozen_b)
    assert not any(p.requires_grad for p in lorakit.adapter_parameters(model, "ab").values())
    assert lorakit.active_adapters(model) == ["b"]
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["o_proj"]), adapter="d")
    assert not model.model.norm.weight.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lorakit.adapter_parameters(model, "d"))
