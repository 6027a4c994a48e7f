"""The fused LoRA linear (one autograd node): same values and gradients as the plain formula, used only where valid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers import SMALL_BATCH_ROWS, LoraSpec, attach


def _layer(dtype: torch.dtype = torch.float32, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias).to(dtype).requires_grad_(False)
    attach(layer).add_adapter("a", LoraSpec(r=4, alpha=8))
    with torch.no_grad():
        layer.lora_B["a"].normal_()  # B = 0 at init would hide a wrong B·A term
    return layer


def _reference(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """h = W0·x + b + (alpha/r)·B·A·x in fp32 with plain autograd ops."""
    W = layer.weight.float()
    b = layer.bias.float() if layer.bias is not None else None
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    return F.linear(x.float(), W, b) + 2.0 * (x.float() @ A.t()) @ B.t()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_formula_values_and_grads(dtype, tol, bias):
    layer = _layer(dtype, bias)
    x = torch.randn(3, 5, 24, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    g = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(2))
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_FrozenLinearLoraBackward" and out.dtype == dtype
    out.backward(g.to(dtype))
    got = (out.float(), x.grad.float(), layer.lora_A["a"].grad, layer.lora_B["a"].grad)
    assert got[2].dtype == got[3].dtype == torch.float32  # fp32 adapters get fp32 grads
    x_ref = x.detach().float().requires_grad_(True)
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    A.grad = B.grad = None
    ref = _reference(layer, x_ref)
    ref.backward(g)
    for a, b in zip(got, (ref, x_ref.grad, A.grad, B.grad)):
        assert ((a - b).norm() / b.norm()) < tol
    assert layer.weight.grad is None


def test_fused_saves_no_output_sized_tensor():
    layer = _layer()
    x = torch.randn(16, 24, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        layer(x)
    # activations: x and h only; the rest are the layer's own parameters (W0, b, A, B: no copies) and the cast factors
    assert sorted(shapes) == sorted([(16, 24), (16, 4), (40, 24), (40,), (4, 24), (40, 4), (4, 24), (4, 40)])


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.weight.requires_grad_(True),  # full fine-tuning of W0 needs its own gradient
        lambda m: m.bias.requires_grad_(True),  # bias="all"
        lambda m: (setattr(m, "lora_specs", {"a": LoraSpec(r=4, alpha=8, dropout=0.5)}), m.train()),
        lambda m: (m.add_adapter("b", LoraSpec(r=2, alpha=2)), setattr(m, "active_adapters", ["a", "b"])),
    ],
)
def test_generic_path_where_fused_does_not_apply(change):
    layer = _layer()
    change(layer)
    out = layer(torch.randn(2, 24, requires_grad=True))
    assert type(out.grad_fn).__name__ != "_FrozenLinearLoraBackward"


def test_fused_path_under_no_grad_equals_formula():
    layer = _layer()
    x = torch.randn(7, 24)
    with torch.inference_mode():
        out = layer(x)
    torch.testing.assert_close(out, _reference(layer, x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["no_grad", "frozen_adapter"])
def test_path_without_autograd_node_equals_formula(mode):
    layer = _layer()
    x = torch.randn(2, 7, 24)
    if mode == "frozen_adapter":  # grad mode on, but nothing here requires grad: no node to record
        layer.lora_A["a"].requires_grad_(False)
        layer.lora_B["a"].requires_grad_(False)
        out = layer(x)
    else:
        with torch.no_grad():
            out = layer(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, _reference(layer, x).detach(), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)  # an input that needs grad brings the autograd node back
    assert type(layer(x).grad_fn).__name__ == "_FrozenLinearLoraBackward"


@pytest.mark.parametrize(
    "change",
    ["inplace_step", "fused_adamw_step", "data_assignment", "new_parameter", "reinject_same_name", "alpha"],
)
def test_cached_inference_factors_follow_every_change_of_the_adapter(change):
    layer = _layer()
    x = torch.randn(2, 7, 24)
    with torch.inference_mode():
        layer(x)  # fills the cache
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    if change == "inplace_step":  # what an optimizer step or load_state_dict does
        with torch.no_grad():
            A.add_(0.5)
            B.mul_(-2.0)
    elif change == "fused_adamw_step":  # a fused optimizer updates in place without bumping version counters
        opt = torch.optim.AdamW([A, B], lr=0.5, fused=True)
        layer(x.requires_grad_(True)).sum().backward()
        opt.step()  # (in torch 2.13 A and B keep their version counters through it)
    elif change == "data_assignment":
        B.data = torch.randn_like(B)
    elif change == "new_parameter":
        layer.lora_A["a"] = nn.Parameter(torch.randn_like(A))
    elif change == "reinject_same_name":
        layer.remove_adapter("a")
        assert "a" not in layer.__dict__.get("_lora_infer_cache", {})  # delete frees the cached copies
        layer.add_adapter("a", LoraSpec(r=4, alpha=8))
        with torch.no_grad():
            layer.lora_B["a"].normal_()
    else:
        layer.lora_specs["a"] = LoraSpec(r=4, alpha=16)
    with torch.no_grad():
        out = layer(x)
    expected = _reference(layer, x).detach()
    if change == "alpha":
        W, b = layer.weight, layer.bias
        expected = F.linear(x, W, b) + 4.0 * (x @ layer.lora_A["a"].t()) @ layer.lora_B["a"].t()
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [5, SMALL_BATCH_ROWS + 1])
def test_bf16_inference_runs_the_update_in_fp32_for_few_rows_only(rows):
    layer = _layer(torch.bfloat16)
    x = torch.randn(rows, 24, dtype=torch.bfloat16)
    At = layer.lora_A["a"].t().to(torch.bfloat16)  # the factors rounded as the activations are
    Bt = (2.0 * layer.lora_B["a"].t()).to(torch.bfloat16)
    base = F.linear(x, layer.weight, layer.bias)
    # decode steps: fp32 update added to the bf16 base output, rounded once; prefill: the bf16 GEMMs
    few = rows <= SMALL_BATCH_ROWS
    expected = base.add_((x.float() @ At.float()) @ Bt.float()) if few else base.addmm_(x @ At, Bt)
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)
