"""Every LoRA layer type on small hand-built models: Linear, GPT-2 Conv1D (whole and fused slices),
Embedding, Conv1d, Conv2d. Invariants: equal to the base at init, counts, grads, merge/unmerge."""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorakit
from conftest import assert_rounded_once
from lorakit.adapters import randomize_adapters
from lorakit.layers import LoraLayer, LoraSpec, adapter_shapes, attach, detach, supports

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


@dataclass
class Case:
    """A tiny model, an input for it, the config that adapts it, and the paper's trainable count."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    cfg: lorakit.LoraConfig
    count: Callable[[int], int]  # r -> expected number of adapter parameters


def _x(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(3))


CASES = {
    # Σ r·(d_in + d_out) over the adapted layers
    "linear": Case(
        lambda: nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)),
        _x(4, 5, 12),
        lorakit.LoraConfig(r=3, alpha=6, target_modules=["0", "2"]),
        lambda r: r * (12 + 10) + r * (10 + 6),
    ),
    "conv1d_gpt2": Case(
        lambda: nn.Sequential(Conv1D(18, 12), nn.Tanh(), Conv1D(12, 18)),
        _x(2, 5, 12),
        lorakit.LoraConfig(r=3, alpha=6, target_modules=["0", "2"]),
        lambda r: r * (12 + 18) + r * (18 + 12),
    ),
    # fused q,k,v in one Conv1D (GPT-2's c_attn): only q and v adapted, r·(d_in + d_slice) per slice
    "conv1d_gpt2_fused_qv": Case(
        lambda: nn.Sequential(Conv1D(3 * 8, 12)),
        _x(2, 5, 12),
        lorakit.LoraConfig(r=2, alpha=4, target_modules=["0"], enable_lora={"0": [True, False, True]}),
        lambda r: 2 * r * (12 + 8),
    ),
    "embedding": Case(
        lambda: nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4)),
        lambda: torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(3)),
        lorakit.LoraConfig(r=4, alpha=8, target_modules=["0"]),
        lambda r: r * (20 + 8),
    ),
    # convolutions: A is a conv with the base kernel, so r·(c_in·kernel + c_out)
    "conv1d": Case(
        lambda: nn.Sequential(nn.Conv1d(3, 5, 3, padding=1)),
        _x(2, 3, 10),
        lorakit.LoraConfig(r=2, alpha=4, target_modules=["0"]),
        lambda r: r * (3 * 3 + 5),
    ),
    "conv2d": Case(
        lambda: nn.Sequential(nn.Conv2d(3, 4, (3, 3), stride=2, padding=1), nn.Tanh(), nn.Conv2d(4, 6, 1)),
        _x(2, 3, 8, 8),
        lorakit.LoraConfig(r=2, alpha=4, target_modules=["0", "2"]),
        lambda r: r * (3 * 9 + 4) + r * (4 * 1 + 6),
    ),
}

case_names = pytest.mark.parametrize("name", list(CASES))


def _build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, Case]:
    case = CASES[name]
    torch.manual_seed(seed)
    return case.build().eval(), case.inputs(), case


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@case_names
def test_output_equals_base_at_init_exactly(name):
    model, x, case = _build(name)
    base = _out(model, x)
    lorakit.inject(model, case.cfg)
    assert any(isinstance(m, LoraLayer) for m in model.modules())
    assert torch.equal(_out(model, x), base)


@case_names
def test_trainable_count_is_sum_of_r_times_d_in_plus_d_out(name):
    model, _, case = _build(name)
    total = sum(p.numel() for p in model.parameters())
    lorakit.inject(model, case.cfg)
    expected = case.count(case.cfg.r)
    assert lorakit.trainable_parameters(model) == (expected, total + expected)


@case_names
def test_only_adapter_tensors_get_grads_and_change(name):
    model, x, case = _build(name)
    lorakit.inject(model, case.cfg)
    randomize_adapters(model, std=0.1)
    before = _weights(model)
    lora = {n for n, p in model.named_parameters() if ".lora_" in n}
    assert lora and {n for n, p in model.named_parameters() if p.requires_grad} == lora
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        if n in lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    opt.step()
    after = _weights(model)
    for k in before:
        assert torch.equal(before[k], after[k]) == (k not in lora), k


@case_names
def test_merged_equals_unmerged_and_unmerge_restores_w0(name):
    model, x, case = _build(name)
    w0 = _weights(model)
    lorakit.inject(model, case.cfg)
    randomize_adapters(model, std=0.1)
    unmerged = _out(model, x)
    assert not torch.allclose(unmerged, _out(_build(name)[0], x), atol=1e-4)  # the adapter does something
    lorakit.merge(model)
    merged_w = _weights(model)
    torch.testing.assert_close(_out(model, x), unmerged, atol=1e-5, rtol=0)
    lorakit.merge(model)  # idempotent
    assert all(torch.equal(merged_w[k], v) for k, v in _weights(model).items())
    lorakit.unmerge(model)
    lorakit.unmerge(model)  # idempotent
    for k, v in w0.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(_out(model, x), unmerged, atol=1e-5, rtol=0)


@case_names
def test_merge_and_unload_gives_the_plain_model_with_the_same_output(name):
    model, x, case = _build(name)
    classes = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    lorakit.inject(model, case.cfg)
    randomize_adapters(model, std=0.1)
    unmerged = _out(model, x)
    plain = lorakit.merge_and_unload(model)
    assert plain is model
    assert [type(m) for m in plain.modules()] == classes
    assert list(plain.state_dict()) == keys
    assert "_lorakit" not in plain.__dict__
    torch.testing.assert_close(_out(plain, x), unmerged, atol=1e-5, rtol=0)
    fresh = _build(name)[0]
    fresh.load_state_dict(plain.state_dict(), strict=True)  # a merged checkpoint loads into a plain model
    torch.testing.assert_close(_out(fresh, x), unmerged, atol=1e-5, rtol=0)


@case_names
def test_unload_restores_classes_and_w0_exactly(name):
    model, x, case = _build(name)
    classes = [type(m) for m in model.modules()]
    w0, base = _weights(model), _out(model, x)
    lorakit.inject(model, case.cfg)
    randomize_adapters(model, std=0.1)
    lorakit.merge(model)
    plain = lorakit.unload(model)
    assert [type(m) for m in plain.modules()] == classes
    assert all(p.requires_grad for p in plain.parameters())
    for k, v in w0.items():
        torch.testing.assert_close(plain.state_dict()[k], v, atol=1e-6, rtol=0)
    torch.testing.assert_close(_out(plain, x), base, atol=1e-5, rtol=0)


@case_names
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_with_fp32_adapters(name, dtype):
    model, x, case = _build(name)
    model.to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    base = _out(model, x)
    lorakit.inject(model, case.cfg)
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert torch.equal(_out(model, x), base)
    randomize_adapters(model, std=0.1)
    unmerged = _out(model, x)
    assert unmerged.dtype == dtype
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    exact = [m.weight.double() + m.delta_weight("default").double() for m in layers]
    lorakit.merge(model)
    for m, w in zip(layers, exact):
        assert m.weight.dtype == dtype
        assert_rounded_once(m.weight.detach(), w)  # computed in fp32, cast back once
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(_out(model, x).float(), unmerged.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["linear", "conv1d_gpt2", "conv2d"])
def test_lora_bias_trains_and_merges_into_the_base_bias(name):
    model, x, case = _build(name)
    bias0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    lorakit.inject(model, case.cfg.replace(lora_bias=True))
    lb = {n: p for n, p in model.named_parameters() if "lora_B_bias" in n}
    assert len(lb) == len(case.cfg.target_modules) and all(p.requires_grad for p in lb.values())
    randomize_adapters(model, std=0.1)
    unmerged = _out(model, x)
    lorakit.merge(model)
    torch.testing.assert_close(_out(model, x), unmerged, atol=1e-5, rtol=0)
    assert any(not torch.equal(model.state_dict()[n], b) for n, b in bias0.items())
    lorakit.unmerge(model)
    for n, b in bias0.items():
        torch.testing.assert_close(model.state_dict()[n], b, atol=1e-6, rtol=0)


def test_lora_bias_on_a_layer_without_bias_refuses_to_merge_and_changes_nothing():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 4, bias=False))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0", "1"], lora_bias=True))
    randomize_adapters(model, std=0.1)
    before = _weights(model)
    with pytest.raises(ValueError, match="bias"):
        lorakit.merge(model)
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))


def test_dropout_applies_in_train_mode_only():
    model, x, case = _build("linear")
    lorakit.inject(model, case.cfg.replace(dropout=0.5))
    randomize_adapters(model, std=0.3)
    eval_out = _out(model, x)
    torch.testing.assert_close(_out(model, x), eval_out)  # deterministic in eval
    model.train()
    torch.manual_seed(0)
    train_out = _out(model, x)
    assert not torch.allclose(train_out, eval_out, atol=1e-4)


@pytest.mark.parametrize("name", ["linear", "embedding", "conv2d", "conv1d_gpt2_fused_qv"])
def test_adapter_tensor_shapes_follow_peft_layout(name):
    model, _, case = _build(name)
    lorakit.inject(model, case.cfg)
    for m in model.modules():
        if isinstance(m, LoraLayer):
            shapes = adapter_shapes(m, m.lora_specs["default"])
            assert tuple(m.lora_A["default"].shape) == shapes["lora_A"]
            assert tuple(m.lora_B["default"].shape) == shapes["lora_B"]
            assert m.delta_weight("default").shape == m.weight.shape
    if name == "embedding":  # PEFT's embedding init: A zero, B random
        emb = model[0]
        assert torch.count_nonzero(emb.lora_A["default"]) == 0 and torch.count_nonzero(emb.lora_B["default"]) > 0
    elif name != "conv1d_gpt2_fused_qv":
        first = model[0]
        assert torch.count_nonzero(first.lora_B["default"]) == 0 and torch.count_nonzero(first.lora_A["default"]) > 0


def test_fused_slices_leave_the_k_outputs_untouched():
    model, x, case = _build("conv1d_gpt2_fused_qv")
    base = _out(model, x)
    lorakit.inject(model, case.cfg)
    randomize_adapters(model, std=0.2)
    out = _out(model, x)
    torch.testing.assert_close(out[..., 8:16], base[..., 8:16], atol=1e-6, rtol=0)  # k slice
    assert not torch.allclose(out[..., :8], base[..., :8], atol=1e-3)
    assert not torch.allclose(out[..., 16:], base[..., 16:], atol=1e-3)


@pytest.mark.parametrize("make", [lambda: nn.Embedding(10, 8), lambda: nn.Conv1d(4, 8, 3)], ids=["embedding", "conv1d"])
def test_fused_slices_on_a_non_linear_layer_are_refused(make):
    """A fused-slice spec gives no valid layout on an embedding or conv (the embedding got sliced shapes silently)."""
    spec = LoraSpec(r=2, alpha=2, enabled=(True, False))
    with pytest.raises(ValueError, match=r"applies to linear layers \(nn.Linear, GPT-2 Conv1D\) only, not to (Embedding|Conv1d)"):
        adapter_shapes(make(), spec)
    with pytest.raises(ValueError, match="applies to linear layers"):
        attach(make()).add_adapter("default", spec)


def test_attach_keeps_the_object_and_detach_restores_the_class():
    lin = nn.Linear(4, 3)
    weight = lin.weight
    layer = attach(lin)
    assert layer is lin and isinstance(lin, nn.Linear) and isinstance(lin, LoraLayer)
    assert type(lin).__name__ == "LoraLinear" and lin.weight is weight
    assert attach(lin) is lin  # attaching twice is a no-op
    detach(lin)
    assert type(lin) is nn.Linear and list(lin.state_dict()) == ["weight", "bias"]
    assert not hasattr(lin, "lora_A") and "_lora_base_class" not in lin.__dict__


def test_supported_layer_types():
    assert supports(nn.Linear(2, 2)) and supports(Conv1D(2, 2)) and supports(nn.Embedding(3, 2))
    assert supports(nn.Conv1d(1, 1, 1)) and supports(nn.Conv2d(1, 1, 1)) and supports(nn.Conv3d(1, 1, 1))
    assert not supports(nn.LayerNorm(2)) and not supports(nn.ConvTranspose2d(1, 1, 1))


def test_gaussian_init_as_the_paper():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512))
    lorakit.inject(model, lorakit.LoraConfig(r=16, target_modules=["0"], init="gaussian"))
    A = model[0].lora_A["default"]
    assert A.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert torch.count_nonzero(model[0].lora_B["default"]) == 0
    torch.manual_seed(0)
    kaiming = nn.Sequential(nn.Linear(512, 512))
    lorakit.inject(kaiming, lorakit.LoraConfig(r=16, target_modules=["0"]))
    assert kaiming[0].lora_A["default"].abs().max() <= 1 / math.sqrt(512)


# ---- layers and owners LoRA cannot change (verifier round 2026-12-02) ---------------------------------

@pytest.mark.parametrize("make, target", [
    (lambda: nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), "linear1"),
    (lambda: nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), "self_attn.out_proj"),
    (lambda: nn.Sequential(nn.Embedding(20, 8, sparse=True)), "0"),
    (lambda: nn.Sequential(nn.Embedding(20, 8, max_norm=1.0)), "0"),
])
def test_layers_whose_forward_is_bypassed_or_unfit_are_refused(make, target):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"target '{target}' cannot carry LoRA"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=[target]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_all_linear_skips_the_fused_encoder_layer_and_adapts_the_rest():
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), nn.Linear(16, 16), nn.Linear(16, 3))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert [p for p, m in model.named_modules() if isinstance(m, LoraLayer)] == ["1", "2"]


def test_fused_slices_with_lora_bias_leave_the_unadapted_slice_alone():
    """enable_lora [q, -, v] + lora_bias: k's output never changes and its bias entries get no gradient."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 12)
    model = nn.Sequential(layer)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"], enable_lora={"0": [True, False, True]}, lora_bias=True))
    randomize_adapters(model, std=0.5)
    x = torch.randn(5, 8)
    base_k = nn.functional.linear(x, layer.weight, layer.bias)[:, 4:8]
    out = model(x)
    assert torch.equal(out[:, 4:8], base_k)
    out.square().sum().backward()
    grad = layer.lora_B_bias["default"].grad
    assert torch.equal(grad[4:8], torch.zeros(4)) and grad[:4].abs().sum() > 0 and grad[8:].abs().sum() > 0
    unmerged = model(x).detach()
    lorakit.merge(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)


def test_second_order_gradients_through_the_fused_layer_match_plain_autograd():
    """create_graph=True (Hessian-vector products) replays the layer in plain ops: same as torch.func's HVP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0", "2"]))
    randomize_adapters(model, std=0.3)
    x = torch.randn(4, 6, requires_grad=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    vec = [torch.randn_like(p) for p in params]
    grads = torch.autograd.grad(model(x).square().sum(), params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vec)), params)

    def loss(ps):
        return torch.func.functional_call(model, ps, (x.detach(),)).square().sum()

    primal = {n: p.detach() for n, p in zip(names, params)}
    _, ref = torch.func.jvp(torch.func.grad(loss), (primal,), ({n: v for n, v in zip(names, vec)},))
    for n, h in zip(names, hvp):
        torch.testing.assert_close(h, ref[n], atol=1e-5, rtol=1e-5)


def test_torch_func_and_forward_mode_ad_work_on_lora_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    randomize_adapters(model, std=0.3)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(3, 6)
    per_sample = torch.func.vmap(
        torch.func.grad(lambda ps, xi: torch.func.functional_call(model, ps, (xi[None],)).sum()), in_dims=(None, 0)
    )(params, x)
    for i in range(3):
        model.zero_grad()
        model(x[i : i + 1]).sum().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[n][i], p.grad)
    tangent = torch.randn(3, 6)
    _, jvp = torch.func.jvp(model, (x,), (tangent,))
    eps = 1e-3
    torch.testing.assert_close(jvp, (model(x + eps * tangent) - model(x - eps * tangent)) / (2 * eps), atol=1e-3, rtol=1e-3)


def test_bf16_output_at_init_equals_the_base_layer_for_non_contiguous_input():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).bfloat16()
    x = torch.randn(2, 6, 7).bfloat16().transpose(1, 2)
    expected = layer(x)
    model = nn.Sequential(layer)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert torch.equal(model(x), expected)


def test_meta_device_model_gets_real_adapters_from_init_adapters():
    from conftest import tiny_llama

    base = tiny_llama()
    with torch.device("meta"):
        model = type(base)(base.config)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8))
    model.to_empty(device="cpu")
    model.load_state_dict(base.state_dict(), strict=False)
    for name, buf in model.named_buffers():  # non-persistent (rotary tables): not in the state dict
        buf.copy_(dict(base.named_buffers())[name])
    lorakit.init_adapters(model)
    model.eval()
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # B = 0 again, so the base model's output
    A = model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert A.abs().sum() > 0 and torch.isfinite(A).all()


class _GatedNorm(nn.Module):
    """An fp32 RMSNorm (frozen weight·(h·rsqrt(var)): autograd keeps only the weight) feeding q, and a gated
    product act(gate)·up (both factors kept) feeding down."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_weight = nn.Parameter(torch.rand(8) + 0.5, requires_grad=False)
        self.q, self.gate, self.up, self.down = nn.Linear(8, 8), nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, h: torch.Tensor, copy_inputs: bool = False) -> torch.Tensor:
        keep = (lambda t: t.clone()) if copy_inputs else (lambda t: t)  # a clone is no product: the layer keeps it
        x = keep(self.norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)))
        x = x + self.q(x)
        return self.down(keep(nn.functional.silu(self.gate(x)) * self.up(x)))


def test_products_autograd_keeps_are_rebuilt_bit_for_bit_and_not_kept_twice():
    """A layer input that is a product of saved factors is rebuilt in backward: same gradients to the bit, x not kept."""
    torch.manual_seed(0)
    model = _GatedNorm()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q", "gate", "up", "down"]))
    randomize_adapters(model, std=0.3)
    h = torch.randn(3, 5, 8, requires_grad=True)
    grads = []
    for copy_inputs in (False, True):
        model.zero_grad()
        h.grad = None
        model(h, copy_inputs).square().sum().backward()
        grads.append([h.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for rebuilt, kept in zip(*grads):
        assert torch.equal(rebuilt, kept)

    params = [p for p in model.parameters() if p.requires_grad]
    vec = [torch.randn_like(p) for p in params]
    hvps = []
    for copy_inputs in (False, True):  # create_graph=True: the rebuilt x carries the factors' graph
        g = torch.autograd.grad(model(h, copy_inputs).square().sum(), [h, *params], create_graph=True)
        hvps.append(torch.autograd.grad(sum((gi * v).sum() for gi, v in zip(g[1:], vec)), [h, *params]))
    for rebuilt, kept in zip(*hvps):
        torch.testing.assert_close(rebuilt, kept, atol=1e-5, rtol=1e-5)

    seen: list[torch.Tensor] = []
    hook = model.down.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = model(h)
    hook.remove()
    ref = weakref.ref(seen.pop())
    gc.collect()
    assert ref() is None, "the down projection kept its input alive although autograd keeps act(gate) and up"
    out.sum().backward()
    assert model.down.lora_A["default"].grad is not None


def _one_lora_linear(d_in: int, d_out: int) -> nn.Sequential:
    """nn.Linear(d_in, d_out) with a rank-2 adapter whose B is not zero (seeded: the tests' tensors follow it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    randomize_adapters(model, std=0.3)
    return model


def _grads(model: nn.Sequential) -> list[torch.Tensor]:
    """[A.grad, B.grad] of `_one_lora_linear`'s adapter."""
    return [model[0].lora_A["default"].grad.clone(), model[0].lora_B["default"].grad.clone()]


def _adapter_grads(model: nn.Sequential, x: torch.Tensor, backwards: int = 1,
                   between: Callable[[], None] = lambda: None) -> list[torch.Tensor]:
    """`_grads` after `backwards` backward passes of ‖model(x)‖² through one retained graph, `between` before each next."""
    model.zero_grad()
    y = model(x).square().sum()
    for i in range(backwards):
        if i:
            between()
        y.backward(retain_graph=True)
    return _grads(model)


def test_a_product_changed_in_place_or_under_checkpointing_is_kept_as_is():
    """x = a·b changed in place without autograd, a factor changed in place, or activation checkpointing
    (saved-tensor hooks): the layer keeps x; gradients as for a plain x, the forward as without the rebuild."""
    model = _one_lora_linear(6, 4)
    a, b = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)

    changed = a * b
    with torch.no_grad():
        changed.add_(1.0)  # not recorded: the value is no longer a·b
    want = _adapter_grads(model, (a * b + 1.0).detach())
    for got, expected in zip(_adapter_grads(model, changed), want):
        assert torch.equal(got, expected)

    factor = a * 1.0
    x = factor * b
    factor.add_(1.0)  # recorded, on a factor the product's own backward needs: plain autograd fails only in backward
    torch.testing.assert_close(model(x), model(x.detach()))  # the forward still runs, keeping x
    calls = []

    def block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return model(a * b)

    model.zero_grad()
    checkpoint(block, a, b, use_reentrant=False).square().sum().backward()
    assert len(calls) == 2, "unpacking a checkpointed factor during forward re-ran the block"  # forward + backward's recompute
    for got, expected in zip(_grads(model), _adapter_grads(model, (a * b).detach())):
        assert torch.equal(got, expected)


def test_factors_packed_by_saved_tensor_hooks_are_not_unpacked_in_forward():
    """Hooks that covered only the product (compression, one-shot offload, a checkpointed SwiGLU): x is kept."""
    model = _one_lora_linear(12, 8)
    g, u = torch.randn(5, 12, requires_grad=True), torch.randn(5, 12, requires_grad=True)

    def lossy() -> torch.Tensor:  # activation compression: bf16 copies of what the product saves
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.to(torch.bfloat16), lambda t: t.float()):
            return nn.functional.silu(g) * u
    assert torch.equal(_adapter_grads(model, lossy())[0], _adapter_grads(model, lossy().clone())[0])

    def one_shot() -> torch.Tensor:  # offload-style: the stored copy is freed when unpacked
        store: dict[int, torch.Tensor] = {}

        def pack(t: torch.Tensor) -> int:
            store[len(store)] = t
            return len(store) - 1
        with torch.autograd.graph.saved_tensors_hooks(pack, store.pop):
            return nn.functional.silu(g) * u
    assert torch.equal(_adapter_grads(model, one_shot())[0], _adapter_grads(model, one_shot().clone())[0])

    calls = []

    def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return nn.functional.silu(a) * b
    _adapter_grads(model, checkpoint(swiglu, g, u, use_reentrant=False))
    assert len(calls) == 2, "reading the checkpointed factors in forward re-ran the checkpointed function"


def test_products_whose_factor_autograd_cannot_vouch_for_keep_x():
    """A factor autograd did not keep (changed under no_grad before the product), or a trained leaf factor
    updated without a version bump (fused optimizers, ``.data``) between two backwards: x is kept, grads as plain."""
    model = _one_lora_linear(8, 6)
    h = torch.randn(3, 8, requires_grad=True)
    norm_weight = torch.rand(8) + 0.5

    def clamped_norm() -> torch.Tensor:
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        with torch.no_grad():
            n.clamp_(-0.5, 0.5)  # unseen by autograd; the product below keeps only norm_weight
        return norm_weight * n

    assert torch.equal(_adapter_grads(model, clamped_norm())[0], _adapter_grads(model, clamped_norm().clone())[0])

    trained = nn.Parameter(torch.rand(8) + 0.5)
    n = h * 2.0

    def step() -> None:
        trained.data.add_(1.0)  # what a fused AdamW step looks like to autograd: no version bump
    for factor in (lambda: trained, lambda: trained.view(1, 8)):  # the leaf itself, or a view of it
        start = trained.detach().clone()
        rebuilt = _adapter_grads(model, factor() * n, 2, step)[0]
        trained.data.copy_(start)
        assert torch.equal(rebuilt, _adapter_grads(model, (factor() * n).clone(), 2, step)[0])
        trained.data.copy_(start)
