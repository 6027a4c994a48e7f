"""Merging on tiny LLaMA / GPT-2 / BERT: merged == unmerged == merge_and_unload, W0 restored, idempotent."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from conftest import BUILDERS, assert_rounded_once, logits, tiny_llama
from lorakit.adapters import randomize_adapters
from lorakit.layers import LoraLayer
from lorakit.state import is_merged

archs = pytest.mark.parametrize("arch", list(BUILDERS))
targets = pytest.mark.parametrize("target", [None, "all-linear"])


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _adapted(arch: str, target, **kw) -> nn.Module:
    model = lorakit.inject(BUILDERS[arch](), lorakit.LoraConfig(r=3, alpha=6, target_modules=target, **kw))
    randomize_adapters(model, std=0.1, seed=1)
    return model


@archs
@targets
def test_merged_equals_unmerged_equals_merge_and_unload(arch, target, input_ids):
    model = _adapted(arch, target)
    base = logits(BUILDERS[arch](), input_ids)
    unmerged = logits(model, input_ids)
    assert (unmerged - base).abs().max() > 1e-4  # the random adapter changes the output
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, input_ids), unmerged, atol=1e-5, rtol=0)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not any(".lora_" in k for k in plain.state_dict())
    torch.testing.assert_close(logits(plain, input_ids), unmerged, atol=1e-5, rtol=0)
    fresh = BUILDERS[arch]()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, input_ids), unmerged, atol=1e-5, rtol=0)


@archs
def test_merge_and_unload_from_unmerged_state(arch, input_ids):
    model = _adapted(arch, None)
    unmerged = logits(model, input_ids)
    torch.testing.assert_close(logits(lorakit.merge_and_unload(model), input_ids), unmerged, atol=1e-5, rtol=0)


@archs
def test_merge_and_unmerge_are_idempotent_and_unmerge_restores_w0(arch, input_ids):
    w0 = _weights(BUILDERS[arch]())
    model = _adapted(arch, "all-linear")
    unmerged = logits(model, input_ids)
    lorakit.merge(model)
    once = _weights(model)
    assert any(not torch.equal(once[k], w0[k]) for k in w0)
    lorakit.merge(model)
    assert all(torch.equal(once[k], v) for k, v in _weights(model).items())
    lorakit.unmerge(model)
    restored = _weights(model)
    for k, v in w0.items():
        torch.testing.assert_close(restored[k], v, atol=1e-6, rtol=0)
    lorakit.unmerge(model)
    assert all(torch.equal(restored[k], v) for k, v in _weights(model).items())
    torch.testing.assert_close(logits(model, input_ids), unmerged, atol=1e-5, rtol=0)


def test_merge_does_not_happen_on_eval_or_train():
    model = _adapted("llama", None)
    w = _weights(model)
    model.train()
    model.eval()
    assert all(torch.equal(w[k], v) for k, v in _weights(model).items())
    assert all(not m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))


@archs
def test_unload_drops_adapters_and_gives_back_w0_and_the_base_output(arch, input_ids):
    base_model = BUILDERS[arch]()
    base, w0 = logits(base_model, input_ids), _weights(base_model)
    classes = [type(m) for m in base_model.modules()]
    model = _adapted(arch, "all-linear")
    lorakit.merge(model)
    plain = lorakit.unload(model)
    assert [type(m) for m in plain.modules()] == classes
    assert list(plain.state_dict()) == list(w0)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(plain, input_ids), base, atol=1e-5, rtol=0)
    assert "_lorakit" not in plain.__dict__


@pytest.mark.parametrize("strip", [lorakit.unload, lorakit.merge_and_unload])
def test_unload_restores_requires_grad_as_before_injection(strip):
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # the user had frozen this
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], bias="all", modules_to_save=["lm_head"]))
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
    strip(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merge_computes_in_fp32_and_casts_back(dtype, input_ids):
    model = tiny_llama().to(dtype)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, std=0.05)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert all(m.lora_A["default"].dtype == torch.float32 for m in layers)
    w0 = [m.weight.detach().clone() for m in layers]
    exact = [w.double() + (m.delta_weight("default").double()) for w, m in zip(w0, layers)]
    unmerged = logits(model, input_ids)
    lorakit.merge(model)
    for m, w in zip(layers, exact):
        assert m.weight.dtype == dtype
        assert_rounded_once(m.weight.detach(), w)
    merged = logits(model, input_ids)
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=0.1, rtol=0.05)
    lorakit.unmerge(model)
    for m, w in zip(layers, w0):
        assert (m.weight.float() - w.float()).abs().max() <= 2 * torch.finfo(dtype).eps * w.float().abs().max()


def _fp16_two_layers(big: str) -> nn.Module:
    """fp16 model with adapters "ok" and `big`; `big`'s ΔW on layer "1" (merged after "0") exceeds fp16's range."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).to(torch.float16)
    for name in ("ok", big):
        lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, target_modules=["0", "1"]), adapter=name)
    randomize_adapters(model, std=0.1, seed=1)
    with torch.no_grad():
        model[0].bias.zero_()  # small inputs to "1", so that the unmerged ΔW·x still fits fp16
        model[1].lora_A[big].fill_(300.0)
        model[1].lora_B[big].fill_(300.0)  # ΔW = 2·300·300 = 1.8e5 > 65504
    return model


def test_a_merge_that_overflows_the_weights_dtype_is_refused_and_changes_nothing():
    model = _fp16_two_layers("big")
    lorakit.set_adapter(model, "big")
    x = torch.randn(3, 8, dtype=torch.float16) * 1e-3
    before, out = _weights(model), model(x)
    assert torch.isfinite(out).all()  # unmerged, ΔW·x fits fp16; ΔW alone does not
    for call in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(ValueError, match=r"cannot merge into '1'.*overflows torch.float16.*keep the adapter unmerged"):
            call(model)
        assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
        assert all(not m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))
        assert not is_merged(model) and torch.equal(model(x), out)


def test_a_merged_swap_that_would_overflow_keeps_the_old_adapter_merged():
    model = _fp16_two_layers("big")
    lorakit.set_adapter(model, "ok")
    lorakit.merge(model)
    x = torch.randn(3, 8, dtype=torch.float16)
    before, out = _weights(model), model(x)
    with pytest.raises(ValueError, match="overflows torch.float16"):
        lorakit.set_adapter(model, "big")
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    assert [m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer)] == [["ok"], ["ok"]]
    assert lorakit.active_adapters(model) == ["ok"] and torch.equal(model(x), out)


def _cancelling() -> tuple[nn.Module, list[torch.Tensor]]:
    """fp16 model whose adapters "a" and "b" each overflow fp16 on layer "1" but cancel out together, [a, b] merged;
    and its two W0."""
    model = _fp16_two_layers("a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, target_modules=["0", "1"]), adapter="b")
    with torch.no_grad():
        model[1].lora_A["b"].fill_(300.0)
        model[1].lora_B["b"].fill_(-300.0)
    w0 = [model[0].weight.detach().clone(), model[1].weight.detach().clone()]
    lorakit.set_adapter(model, ["a", "b"])
    lorakit.merge(model)
    return model, w0


@pytest.mark.parametrize("undo", ["unmerge", "unload", "disable_adapters"])
def test_undoing_a_merge_never_merges_a_subset_that_would_overflow(undo):
    model, w0 = _cancelling()
    if undo == "disable_adapters":
        merged = _weights(model)
        with lorakit.disable_adapters(model):
            assert [torch.equal(model[i].weight, w0[i]) for i in (0, 1)] == [True, True]
        assert all(torch.equal(merged[k], v) for k, v in _weights(model).items())
        assert [m.merged_adapters for m in model if isinstance(m, LoraLayer)] == [["a", "b"], ["a", "b"]]
        return
    getattr(lorakit, undo)(model)  # W0 comes back from its kept copy: no intermediate merge of "a" alone
    assert [torch.equal(model[i].weight, w0[i]) for i in (0, 1)] == [True, True]


def test_deleting_an_adapter_whose_partner_cannot_stay_merged_alone_is_refused_and_changes_nothing():
    model, _ = _cancelling()
    before = _weights(model)
    with pytest.raises(ValueError, match=r"cannot merge into '1'.*overflows torch.float16"):
        lorakit.delete_adapter(model, "b")
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    assert set(lorakit.list_adapters(model)) == {"ok", "a", "b"}
    assert [m.merged_adapters for m in model if isinstance(m, LoraLayer)] == [["a", "b"], ["a", "b"]]
    lorakit.unmerge(model)
    lorakit.delete_adapter(model, "b")  # unmerged, nothing has to fit fp16
    assert set(lorakit.list_adapters(model)) == {"ok", "a"}


def test_an_fp64_base_merges_in_fp64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).double()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["0"]))
    randomize_adapters(model, std=0.3)
    layer = model[0]
    exact = layer.weight.detach().clone() + 2.0 * layer.lora_B["default"].double() @ layer.lora_A["default"].double()
    lorakit.merge(model)
    torch.testing.assert_close(layer.weight.detach(), exact, atol=1e-14, rtol=0)  # not through fp32 (~3e-8)


def test_merge_of_a_lora_bias_adapter_is_all_or_nothing():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 4, bias=False))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0", "1"], lora_bias=True))
    randomize_adapters(model, std=0.1)
    before = _weights(model)
    with pytest.raises(ValueError, match="lora_bias"):
        lorakit.merge(model)
    with pytest.raises(ValueError, match="lora_bias"):
        lorakit.merge_and_unload(model)
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    assert all(not m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))
    assert "_lorakit" in model.__dict__


def test_merge_without_adapters_is_a_clear_error():
    with pytest.raises(ValueError, match="carries no lorakit adapter"):
        lorakit.merge(tiny_llama())
    with pytest.raises(ValueError, match="carries no lorakit adapter"):
        lorakit.unload(tiny_llama())


def test_meta_device_model_forwards_merges_and_unloads_without_memory():
    with torch.device("meta"):
        model = tiny_llama()
    classes = [type(m) for m in model.modules()]
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert model(torch.zeros(1, 4, dtype=torch.long, device="meta")).logits.shape == (1, 4, 128)
    # merged on meta, a later to_empty + load of the base weights would leave W0's kept copy uninitialised
    with pytest.raises(ValueError, match="meta device.*load the base weights"):
        lorakit.merge(model)
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))
    plain = lorakit.merge_and_unload(model)  # nothing to fold: the plain modules, still without memory
    assert [type(m) for m in plain.modules()] == classes
    assert all(p.is_meta for p in plain.parameters())


def test_merge_and_unload_with_some_layers_on_meta_is_an_error_not_a_silent_drop():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0", "1"]))
    randomize_adapters(model, std=0.3)
    model[1].to("meta")  # as an offloading tool leaves a layer
    with pytest.raises(ValueError, match=r"meta device \('1' holds no values yet\)"):
        lorakit.merge_and_unload(model)
    assert isinstance(model[0], LoraLayer) and not model[0].merged_adapters


class _TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _biased() -> tuple[nn.Module, nn.Module]:
    """(adapted model with a trained bias and a lora_bias on `a`, a plain copy of its base)."""
    torch.manual_seed(0)
    base = _TwoLinear()
    model = _TwoLinear()
    model.load_state_dict(base.state_dict())
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["a"], bias="lora_only", lora_bias=True))
    randomize_adapters(model, std=0.3, seed=1)
    with torch.no_grad():
        model.a.bias.add_(0.5)  # as training would move it
    return model, base


def test_disable_adapters_on_a_merged_model_with_trained_biases_gives_the_base_and_restores_after():
    model, base = _biased()
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
        lorakit.merge(model)
        with lorakit.disable_adapters(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
        lorakit.unmerge(model)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)


def test_adapters_cannot_change_inside_disable_adapters_and_a_nested_block_is_a_no_op():
    model = _adapted("llama", None)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="b")
    lorakit.set_adapter(model, "default")
    lorakit.merge(model)
    with lorakit.disable_adapters(model):
        for action in (lambda: lorakit.set_adapter(model, "b"), lambda: lorakit.delete_adapter(model, "default"),
                       lambda: lorakit.inject(model, lorakit.LoraConfig(r=2), adapter="c"), lambda: lorakit.merge(model)):
            with pytest.raises(ValueError, match="inside a disable_adapters block"):
                action()
        with lorakit.disable_adapters(model):
            pass
        assert all(layer.lora_disabled for layer in model.modules() if isinstance(layer, LoraLayer))
    assert lorakit.active_adapters(model) == ["default"]
    assert all(layer.merged_adapters == ["default"] and not layer.lora_disabled
               for layer in model.modules() if isinstance(layer, LoraLayer) and "default" in layer.lora_specs)


def test_merge_of_an_unknown_adapter_is_an_error_naming_the_adapters():
    model = _adapted("llama", None)
    before = _weights(model)
    for names in ("typo", ["default", "typo"]):
        with pytest.raises(ValueError, match=r"cannot merge \['typo'\]: no such adapter.*\['default'\]"):
            lorakit.merge(model, names)
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())


def test_an_embedding_tied_to_a_head_the_adapter_saves_whole_can_merge(input_ids):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens"], modules_to_save=["lm_head"]))
    randomize_adapters(model, std=0.1, seed=0)
    ref = logits(model, input_ids)  # the head is the adapter's own untied copy: merging the embedding leaves it alone
    torch.testing.assert_close(logits(lorakit.merge_and_unload(model), input_ids), ref, rtol=0, atol=1e-5)


def test_a_layer_shared_under_two_names_merges_once():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # one module object, reached as "0" and "2"
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    randomize_adapters(model, std=0.3)
    x, w0 = torch.randn(3, 6), lin.weight.detach().clone()
    unmerged = model(x)
    lorakit.merge(model)  # not a tie to another module: the one weight takes ΔW once
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)
    lorakit.unmerge(model)
    assert torch.equal(lin.weight, w0)
