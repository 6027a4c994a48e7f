"""bf16 frozen base with fp32 adapters: dtype choice, casting, and correct adapter gradients."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import tiny_bert, tiny_llama
from lorakit.adapters import randomize_adapters
from lorakit.precision import base_dtype_choice, cast_base, describe_precision, pick_base_dtype


def _adapted(seed: int = 0) -> torch.nn.Module:
    model = tiny_llama(seed)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model, std=0.1)
    return model


def _adapter_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("amx", "avx512bf16", "expected"),
    [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)],
)
def test_pick_base_dtype_follows_cpu_features(monkeypatch, amx, avx512bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512bf16)
    assert pick_base_dtype("cpu") is expected
    dtype, reason = base_dtype_choice("cpu")
    assert dtype is expected and reason


def test_cast_base_casts_frozen_weights_only():
    model = _adapted()
    buffers = {n: (b.dtype, b.clone()) for n, b in model.named_buffers()}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cast_base(model, torch.bfloat16)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n  # adapters stay fp32 master weights
        else:
            assert p.dtype == torch.bfloat16, n
            torch.testing.assert_close(p.float(), frozen_before[n].to(torch.bfloat16).float())
    for n, b in model.named_buffers():  # rotary frequencies keep their precision
        assert b.dtype == buffers[n][0] and torch.equal(b, buffers[n][1]), n
    assert "bfloat16" in describe_precision(model) and "trainable: float32" in describe_precision(model)


def test_bf16_base_adapter_grads_match_fp32_reference(input_ids):
    ref = _adapted()
    half = cast_base(copy.deepcopy(ref), torch.bfloat16)
    g_ref, g_half = _adapter_grads(ref, input_ids), _adapter_grads(half, input_ids)
    assert g_ref.keys() == g_half.keys() and len(g_ref) == 2 * 7 * 2
    for n, g in g_half.items():
        assert g.dtype == torch.float32, n
        rel = (g - g_ref[n]).norm() / g_ref[n].norm()
        assert rel < 5e-2, f"{n}: relative error {rel:.3g} beyond bf16 tolerance (bf16 activations: ~1-3 %)"
    # only adapters got gradients: the frozen bf16 base has none
    assert all(p.grad is None for p in half.parameters() if not p.requires_grad)


def test_bf16_base_output_close_to_fp32(input_ids):
    ref = _adapted()
    half = cast_base(copy.deepcopy(ref), torch.bfloat16)
    with torch.no_grad():
        a, b = ref(input_ids).logits, half(input_ids).logits.float()
    assert ((a - b).norm() / a.norm()) < 3e-2


def test_trainable_head_stays_fp32_and_runs(input_ids):
    model = tiny_bert()
    cfg = lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    lorakit.inject(model, cfg)
    cast_base(model, torch.bfloat16)
    cast_base(model, torch.bfloat16)  # idempotent: no second set of hooks
    assert model.classifier.weight.dtype == torch.float32
    assert model.bert.encoder.layer[0].attention.self.key.weight.dtype == torch.bfloat16
    out = model(input_ids).logits
    assert out.dtype == torch.bfloat16  # the head runs in fp32 and hands back the model's dtype
    out.sum().backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.dtype == torch.float32


def test_cast_base_rejects_integer_dtype():
    with pytest.raises(ValueError, match="floating-point"):
        cast_base(_adapted(), torch.int8)


def test_trainable_embedding_copy_in_a_bf16_model_returns_bf16(input_ids):
    """Token ids carry no float dtype to cast back to: the copy's output goes back to the model's dtype."""
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, modules_to_save=["embed_tokens"]))
    randomize_adapters(model, std=0.05)
    reference = copy.deepcopy(model)
    cast_base(model, torch.bfloat16)
    with torch.no_grad():
        out = model(input_ids).logits
        ref = reference(input_ids).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.15, rtol=0.05)
