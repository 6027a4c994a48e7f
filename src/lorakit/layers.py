"""LoRA layer types and the registry from base layer type to LoRA layer.

A LoRA layer *is* the base layer: `attach` swaps the module's class for a subclass that adds
`lora_A`/`lora_B` beside the frozen weight and overrides `forward`. The module object, its
hooks and its parameter names (``q_proj.weight``) stay as they were, so a model's state dict
keeps its keys and `detach` gives back the exact original module.

Per adapter `name` a layer holds ``lora_A[name]``, ``lora_B[name]`` (PEFT orientation, see
`functional.py`), optionally ``lora_B_bias[name]``, and its `LoraSpec`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .functional import cast_in_range, delta_weight, expand_sliced_B, init_lora_A, lora_scale


@dataclass(frozen=True)
class LoraSpec:
    """Per-layer hyper-parameters of one adapter (after rank/alpha patterns)."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    enabled: tuple[bool, ...] | None = None  # fused projection slices, None = whole layer
    lora_bias: bool = False

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.r, self.use_rslora)


class LoraLayer:
    """Mixin shared by every LoRA layer type; see the module docstring."""

    # set by subclasses
    fan_in_fan_out: bool = False
    is_embedding: bool = False

    def base_shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the base layer as the paper counts them."""
        return base_shape(self)

    # ---- adapter bookkeeping -----------------------------------------------------------------
    def _lora_setup(self) -> None:
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_B_bias = nn.ParameterDict()
        self.lora_specs: dict[str, LoraSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.lora_disabled = False

    def add_adapter(self, name: str, spec: LoraSpec, init: str = "kaiming") -> None:
        """Create adapter `name`: A random per `init`, B zero, so the layer's output is unchanged."""
        weight = self.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        shapes = adapter_shapes(self, spec)
        self.lora_A[name] = nn.Parameter(torch.empty(shapes["lora_A"], dtype=dtype, device=weight.device))
        self.lora_B[name] = nn.Parameter(torch.empty(shapes["lora_B"], dtype=dtype, device=weight.device))
        if spec.lora_bias:
            self.lora_B_bias[name] = nn.Parameter(torch.empty(shapes["lora_B_bias"], dtype=dtype, device=weight.device))
        self.lora_specs[name] = spec
        self.reset_adapter(name, init)
        self.active_adapters.append(name)

    @torch.no_grad()
    def reset_adapter(self, name: str, init: str = "kaiming") -> None:
        """Initialise adapter `name` in place: A random per `init`, B (and its bias) zero; embeddings the other
        way round (PEFT's layout). Also what a model built on the meta device needs after ``to_empty``."""
        A, B = self.lora_A[name], self.lora_B[name]
        if A.is_meta:
            return
        if self.is_embedding:
            A.zero_()
            nn.init.normal_(B)
        else:
            init_lora_A(A, init, self.lora_specs[name].r)
            B.zero_()
        if name in self.lora_B_bias:
            self.lora_B_bias[name].zero_()

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name` (unmerging it first) and free its tensors."""
        if name in self.merged_adapters:
            self.set_merged([n for n in self.merged_adapters if n != name])
        for store in (self.lora_A, self.lora_B, self.lora_B_bias):
            if name in store:
                del store[name]
        self.lora_specs.pop(name, None)
        self.__dict__.pop("_lora_mixed_cache", None)  # mixed-batch stacks (multi.py) hold copies of A, B
        self.__dict__.get("_lora_infer_cache", {}).pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def delta_weight(self, name: str) -> Tensor:
        """ΔW of adapter `name` in fp32 (fp64 for an fp64 adapter), shaped like ``self.weight``."""
        spec = self.lora_specs[name]
        return delta_weight(
            self.lora_A[name],
            self.lora_B[name],
            spec.scale,
            fan_in_fan_out=self.fan_in_fan_out,
            enabled=list(spec.enabled) if spec.enabled is not None else None,
            embedding=self.is_embedding,
        )

    def lora_bias(self, name: str) -> Tensor:
        """B's bias of adapter `name` as applied: zero on the slices of a fused layer it does not adapt (those never train)."""
        spec, bias = self.lora_specs[name], self.lora_B_bias[name]
        if spec.enabled is None:
            return bias
        on = torch.tensor(spec.enabled, device=bias.device).repeat_interleave(bias.shape[0] // len(spec.enabled))
        return bias * on

    def scaled_lora_bias(self, name: str) -> Tensor:
        """scale · `lora_bias`: what adapter `name` adds to the layer's output."""
        return self.lora_bias(name) * self.lora_specs[name].scale

    # ---- merging ---------------------------------------------------------------------------
    @torch.no_grad()
    def set_merged(self, names: list[str]) -> None:
        """Make exactly `names` merged in one pass per layer: W ← W0 + Σ ΔW (fp32, cast back).

        While anything is merged an exact copy of W0 (and of the bias) is kept as the
        non-persistent buffer ``lora_w0`` (``lora_b0``), so swaps never accumulate round-off and
        unmerging everything restores W0 bit for bit, after any number of swaps.
        """
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in self.lora_specs]
        if unknown:
            raise ValueError(f"cannot merge {unknown}: this layer has adapters {list(self.lora_specs)}")
        if names == self.merged_adapters:
            return
        if getattr(self, "bias", None) is None and any(n in self.lora_B_bias for n in names):
            raise ValueError("lora_bias needs a base layer with a bias to merge into")
        if not names:
            self.weight.copy_(self._buffers.pop("lora_w0"))
            if "lora_b0" in self._buffers:
                self.bias.copy_(self._buffers.pop("lora_b0"))
            self.merged_adapters = []
            return
        has_bias = getattr(self, "bias", None) is not None  # nn.Embedding has none
        w0 = self._buffers.get("lora_w0", self.weight)
        b0 = self._buffers.get("lora_b0", self.bias if has_bias else None)
        acc = torch.promote_types(w0.dtype, torch.float32)  # fp32, or fp64 for an fp64 base
        weight: Tensor | None = None  # W0 + Σ ΔW in `acc`
        for name in names:
            A, B, spec = self.lora_A[name], self.lora_B[name], self.lora_specs[name]
            plain = spec.enabled is None and not (self.fan_in_fan_out or self.is_embedding) and A.dim() == 2
            if plain and A.dtype == B.dtype and A.dtype in (torch.float32, torch.float64):  # + s·B·A in the GEMM's pass
                A, B = A.to(acc), B.to(acc)
                weight = torch.addmm(w0.to(acc), B, A, alpha=spec.scale) if weight is None else weight.addmm_(B, A, alpha=spec.scale)
            else:
                weight = w0.to(acc, copy=True) if weight is None else weight
                weight += self.delta_weight(name)
        weight = _fitting(weight, self.weight.dtype, "the merged weight")
        bias = None
        if b0 is not None:
            bias = b0.to(acc, copy=True)
            for name in names:
                if name in self.lora_B_bias:
                    bias += self.scaled_lora_bias(name).float()
            bias = _fitting(bias, self.bias.dtype, "the merged bias")
        if "lora_w0" not in self._buffers:  # first merge: keep exact copies of W0 (and the bias) to unmerge to
            self.register_buffer("lora_w0", self.weight.detach().clone(), persistent=False)
            if has_bias:
                self.register_buffer("lora_b0", self.bias.detach().clone(), persistent=False)
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)
        self.merged_adapters = names

    def _unmerged_active(self) -> list[str]:
        if self.lora_disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:  # noqa: D102
        names = self._unmerged_active()
        if len(names) == 1 and not args and not kwargs:
            fused = self.fused_forward(x, names[0])
            if fused is not None:
                return fused
        out = super().forward(x, *args, **kwargs)  # type: ignore[misc]
        for name in names:
            out = self.lora_forward(x, out, name)
        return out

    def fused_forward(self, x: Tensor, name: str) -> Tensor | None:
        """Base layer + adapter `name` as one step where a layer type has a fast path; None otherwise."""
        return None

    def lora_forward(self, x: Tensor, out: Tensor, name: str) -> Tensor:
        """out + scale·B·A·x for adapter `name`."""
        raise NotImplementedError


_optimizer_steps = [0]  # see tensor_fingerprint


def _fitting(t: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    """`t` (fp32) as `dtype`; for a dtype with less range than bf16 (fp16), an error if a value does not fit."""
    if not dtype.is_floating_point or torch.finfo(dtype).max >= torch.finfo(torch.bfloat16).max:
        return t
    cast = cast_in_range(t, dtype)
    if cast is None:
        raise ValueError(
            f"{what} overflows {dtype} (max |value| {t.abs().max().item():.3g}, the dtype's largest "
            f"{torch.finfo(dtype).max:.6g}): keep the adapter unmerged, or merge into a bf16 or fp32 base "
            "(model.to(torch.bfloat16)), which has the range"
        )
    return cast


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    _optimizer_steps[0] += 1


# fused optimizers (AdamW(fused=True)) update parameters in place without bumping their version counters
register_optimizer_step_post_hook(_count_optimizer_step)


def tensor_fingerprint(t: Tensor) -> tuple[int, int, int, int]:
    """(identity, version counter, storage, optimizer steps so far) of `t`: changes on replacement, an in-place
    update, ``.data =``, and any ``torch.optim`` step (fused optimizers leave the version counter alone).

    The key of every cache that holds a copy of an adapter's tensors (inference factors, mixed-batch stacks).
    Not seen: in-place writes through ``.data`` (``p.data.zero_()``), which autograd cannot see either; write
    under ``torch.no_grad()`` instead (``p.zero_()``).
    """
    return id(t), t._version, t.data_ptr(), _optimizer_steps[0]


#: Up to this many token rows, a bf16/fp16 layer's rank-r products run in fp32 (see `lora_math_dtype`).
SMALL_BATCH_ROWS = 64


def lora_math_dtype(x: Tensor) -> torch.dtype:
    """dtype of the inference-time rank-r products for activations `x` (..., k).

    Decode steps (a few token rows) of a bf16/fp16 model run them in fp32: there the tiny GEMMs cost
    their fixed call overhead, and oneDNN's bf16 path pays ~2x fp32's (16 rows × 576: ~80 vs ~40 µs
    per layer); from ~100 rows on bf16's AMX path is the faster one. fp32 also rounds the update once.
    """
    if x.dtype in (torch.bfloat16, torch.float16) and x.numel() <= SMALL_BATCH_ROWS * x.shape[-1]:
        return torch.float32
    return x.dtype


def _cast_factors(A: Tensor, B: Tensor, scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(A (r, k), scale·Bᵀ (r, d)) in `dtype`, contiguous; A is not copied when it already is.

    Contiguous operands and the scale folded into B keep the rank-r GEMMs on the BLAS fast paths (no alpha=).
    """
    A = A.detach().to(dtype).contiguous()
    Bs = torch.mul(B.detach().t(), scale, out=torch.empty(B.shape[1], B.shape[0], dtype=dtype, device=B.device))
    return A, Bs


def skinny(big: Tensor, small: Tensor) -> Tensor:
    """big·smallᵀ for a rank-r `small` (..., r, k) and `big` (..., N, k): (..., N, r), batched or not.

    fp32 computes it as (small·bigᵀ)ᵀ, with r as the GEMM's rows: MKL's fp32 GEMM with only r output
    columns ran 2-4x slower here (AMD EPYC, 512 × 576: 196 µs vs 79 µs); oneDNN's bf16 GEMMs are as
    fast or faster the direct way, so other dtypes keep it.
    """
    if big.dtype == torch.float32:
        return (small @ big.mT).mT
    return big @ small.mT


class _FrozenLinearLora(torch.autograd.Function):
    """y = x·W0ᵀ + b + scale·(x·Aᵀ)·Bᵀ with W0, b frozen, as one autograd node: x (..., k) -> (..., d).

    The tiny A, B are cast to x's dtype (never the activations); the LoRA term goes into the base
    GEMM's output in place, and backward adds scale·(g·B)·A into g·W0 in place, so no second (N, d)
    output and no (N, k) gradient sum. Saves h = x·Aᵀ (N, r), A, scale·Bᵀ and x (A's gradient needs it),
    or, when x is a product autograd can rebuild (`_product_factors`), the factors it keeps anyway.
    A backward that is itself recorded (``create_graph=True``) replays the layer in plain ops instead.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        Ac, Bs = _cast_factors(A, B, scale, x.dtype)
        h = skinny(x2, Ac)  # (N, r)
        out = F.linear(x, weight, bias)  # the base layer's own call: bit-equal to it for any input layout
        out.view(-1, out.shape[-1]).addmm_(h, Bs)  # (N, d)
        factors = _product_factors(x)
        ctx.rebuild = factors is not None
        ctx.save_for_backward(weight, bias, A, B, h, Ac, Bs, *(factors or (x,)))
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, bias, A, B, h, Ac, Bs, *factors = ctx.saved_tensors
        x = torch.mul(*factors) if ctx.rebuild else factors[0]
        if torch.is_grad_enabled():  # create_graph=True: second derivatives must see x, A and B themselves
            return _replay_backward(ctx, grad, x, weight, bias, A, B)
        x2 = x.reshape(-1, x.shape[-1])
        g = grad.reshape(-1, grad.shape[-1])  # (N, d)
        gh = skinny(g, Bs)  # (N, r): gradient of h, scale included
        gx = (g @ weight).addmm_(gh, Ac).view(x.shape) if ctx.needs_input_grad[0] else None
        gA = (gh.t() @ x2).to(A.dtype) if ctx.needs_input_grad[3] else None  # (r, k)
        gB = None
        if ctx.needs_input_grad[4]:  # (d, r): scale·gᵀ·h as (hᵀ·g)ᵀ (2x faster in both dtypes), scaled and cast in one pass
            gB = torch.mul((h.t() @ g).t(), ctx.scale, out=torch.empty(g.shape[1], h.shape[1], dtype=B.dtype, device=g.device))
        return gx, None, None, gA, gB, None


def _product_factors(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """The two factors of `x` = a·b when autograd keeps both anyway, so backward can rebuild x instead of keeping it.

    A gated MLP's down-projection input act(gate)·up is such a product: rebuilt with the same
    ``torch.mul``, bit for bit, it costs all-linear LLaMA training no second copy (about half the
    layer inputs LoRA would keep). None (keep x) when x is no such product, x or a factor was changed in
    place, a factor is (a view of) a trained leaf (a fused optimizer updates it without a version bump), or
    saved-tensor hooks (checkpointing, ``save_on_cpu``, compression) are on or packed the factors:
    those must not be unpacked during forward. Factors autograd did not keep are not rebuilt in turn:
    a write under ``torch.no_grad`` into them would go unseen.
    """
    fn = x.grad_fn
    if fn is None or x._version or fn.name() != "MulBackward0" or _saved_tensor_hooks_on():
        return None
    raw = (getattr(fn, "_raw_saved_self", None), getattr(fn, "_raw_saved_other", None))
    if any(getattr(r, "unpack_hook", True) is not None for r in raw):
        return None
    try:
        a, b = fn._saved_self, fn._saved_other
    except RuntimeError:  # a factor changed in place since (plain autograd fails only in backward): keep x
        return None
    if a is None or b is None or any(_trained_leaf(t) for t in (a, b)):
        return None
    return a, b


def _trained_leaf(t: Tensor) -> bool:
    """Whether `t` is (a view of) a leaf that requires grad: an optimizer may rewrite it without a version bump."""
    base = t if t._base is None else t._base
    return base.is_leaf and base.requires_grad


def _saved_tensor_hooks_on() -> bool:
    """Whether saved-tensor hooks are active (unknown on a torch without the probe: assume they are)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _replay_backward(ctx, grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor) -> tuple:
    """`_FrozenLinearLora`'s gradients as a recorded graph (Hessian-vector products, gradient penalties)."""
    wanted = [i for i in (0, 3, 4) if ctx.needs_input_grad[i]]
    inputs = {0: x, 3: A, 4: B}
    with torch.enable_grad():
        y = F.linear(x, weight, bias) + F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)) * ctx.scale
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], grad, create_graph=True, allow_unused=True)
    out: list[Tensor | None] = [None] * 6
    for i, g in zip(wanted, grads):
        out[i] = g
    return tuple(out)


class LoraLinearMixin(LoraLayer):
    """LoRA for ``nn.Linear`` and GPT-2's ``Conv1D`` (``fan_in_fan_out``): x (..., k) -> (..., d)."""

    def fused_forward(self, x: Tensor, name: str) -> Tensor | None:
        """The hot path: a plain ``nn.Linear`` with frozen W0, b and one plain adapter (no dropout, slices, bias).

        With no gradient to record (``torch.no_grad``/``inference_mode``, or nothing requires grad) it
        runs the same maths as plain ops, without the autograd node: unmerged inference pays only the
        two rank-r products.
        """
        spec = self.lora_specs[name]
        if (
            self._lora_base_class is not nn.Linear
            or spec.enabled is not None
            or spec.lora_bias
            or (spec.dropout and self.training)  # the dropout mask costs what a separate node costs: generic path
            or x.is_meta
            or torch.is_autocast_enabled(x.device.type)  # autocast decides the GEMM dtype: leave it the base layer
            or torch._C._are_functorch_transforms_active()  # torch.func (grad, vmap): plain ops compose with it
            or forward_ad._current_level >= 0  # forward-mode AD: plain ops have their jvp rules
        ):
            return None
        params = self._parameters  # direct lookups: this runs once per layer per forward
        weight, bias = params["weight"], params["bias"]
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        A, B = self._modules["lora_A"]._parameters[name], self._modules["lora_B"]._parameters[name]
        if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
            return _FrozenLinearLora.apply(x, weight, bias, A, B, spec.scale)
        x2 = x.reshape(-1, x.shape[-1])
        dtype = lora_math_dtype(x2)
        Ac, Bs = self._inference_factors(name, A, B, spec.scale, x.dtype, dtype)
        out = F.linear(x, weight, bias)
        out2 = out.view(-1, out.shape[-1])
        if dtype == out.dtype:
            out2.addmm_(skinny(x2, Ac), Bs)  # (N, d)
        else:
            out2.add_(skinny(x2.to(dtype), Ac) @ Bs)  # the fp32 update added and rounded once
        return out

    def _inference_factors(
        self, name: str, A: Tensor, B: Tensor, scale: float, dtype: torch.dtype, math_dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """(A, scale·Bᵀ) rounded to `dtype`, held in `math_dtype`, contiguous, kept until A or B change.

        At inference the casts, the transposes and the scale cost more than the two rank-r products
        (bf16, 128 tokens, 576×576: ~90 of ~210 µs); caching them removes that per forward. Rounding to
        the activations' dtype even when the products run in fp32 gives the values mixed batches use.
        """
        key = (scale, tensor_fingerprint(A), tensor_fingerprint(B))
        # per adapter, one entry per (dtype, math_dtype): generate's bf16 prefill and fp32 decode steps both hit
        cache = self.__dict__.setdefault("_lora_infer_cache", {}).setdefault(name, {})
        hit = cache.get((dtype, math_dtype))
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.inference_mode(False):  # plain tensors, usable outside inference mode too
            factors = tuple(t.to(math_dtype) for t in _cast_factors(A, B, scale, dtype))
        cache[dtype, math_dtype] = (key, factors)
        return factors

    def lora_forward(self, x: Tensor, out: Tensor, name: str) -> Tensor:
        spec = self.lora_specs[name]
        A, B = self.lora_A[name], self.lora_B[name]
        if A.dtype != x.dtype:  # cast the tiny adapter, never the activations
            A, B = A.to(x.dtype), B.to(x.dtype)
        if spec.dropout and self.training:
            x = F.dropout(x, spec.dropout, training=True)
        x2 = x.reshape(-1, x.shape[-1])
        out2 = out.view(-1, out.shape[-1])
        if spec.enabled is not None:  # fused q/k/v: block-structured B, zero rows where not adapted
            B = expand_sliced_B(B, list(spec.enabled))
        h = skinny(x2, A)  # (N, r), or (N, n_on·r) for fused slices
        out2 = out2.addmm(h, B.t(), alpha=spec.scale)  # (N, d): base + scale·B·A·x in one GEMM
        if name in self.lora_B_bias:
            out2 = out2 + self.scaled_lora_bias(name).to(out2.dtype)
        return out2.view(out.shape)


class LoraEmbeddingMixin(LoraLayer):
    """LoRA for ``nn.Embedding``: ids (...) -> (..., dim); A (r, num_embeddings), B (dim, r)."""

    is_embedding = True

    def lora_forward(self, x: Tensor, out: Tensor, name: str) -> Tensor:
        spec = self.lora_specs[name]
        A, B = self.lora_A[name], self.lora_B[name]
        h = F.embedding(x, A.t(), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
        update = (h @ B.t()) * spec.scale
        factor = self.output_factor()
        if factor is not None:
            update = update * factor.to(update.dtype)
        return out + update.to(out.dtype)

    def output_factor(self) -> Tensor | None:
        """The factor a scaled word embedding (Gemma's, BART's ``*ScaledWordEmbedding``: ``embed_scale``) multiplies
        its lookup by, or None. Its output carries it, so the update must too: merged, ΔW is scaled alike (as PEFT)."""
        factor = getattr(self, "embed_scale", None)
        return None if factor is None else torch.as_tensor(factor, device=self.weight.device)


class LoraConvMixin(LoraLayer):
    """LoRA for ``nn.Conv1d/2d/3d``: A is a conv with the base kernel to r channels, B a 1x1 conv."""

    def lora_forward(self, x: Tensor, out: Tensor, name: str) -> Tensor:
        spec = self.lora_specs[name]
        A, B = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
        if spec.dropout and self.training:
            x = F.dropout(x, spec.dropout, training=True)
        # the A conv uses the base layer's own stride/padding/dilation (and padding mode)
        h = self._conv_forward(x, A, None)
        bias = self.lora_B_bias[name].to(x.dtype) if name in self.lora_B_bias else None
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(self.kernel_size)]
        return out + conv(h, B, bias) * spec.scale


# ---- shapes and registry --------------------------------------------------------------------------

def is_conv1d_gpt2(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (weight stored (d_in, d_out)), recognised without importing it."""
    cls = module.__dict__.get("_lora_base_class", type(module))
    return cls.__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a base layer's ΔW as the paper counts them (embedding: (dim, num_embeddings); conv:
    (out_channels, in_channels · kernel size), the flattened weight)."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    if isinstance(module, nn.modules.conv._ConvNd):  # ΔW is out × (in · kernel), the flattened weight
        return module.out_channels, module.in_channels // module.groups * math.prod(module.kernel_size)
    d0, d1 = module.weight.shape[:2]
    return (d1, d0) if is_conv1d_gpt2(module) else (d0, d1)


def adapter_shapes(module: nn.Module, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of ``lora_A``, ``lora_B`` (and ``lora_B_bias``) that `spec` gives on `module`.

    Fused slices: A (n_on·r, d_in), B (n_on, d_out/n_slices, r). Conv: A carries the kernel.
    """
    d_out, d_in = base_shape(module)
    if spec.enabled is not None and not (isinstance(module, nn.Linear) or is_conv1d_gpt2(module)):
        kind = module.__dict__.get("_lora_base_class", type(module)).__name__
        raise ValueError(f"enable_lora (fused slices) applies to linear layers (nn.Linear, GPT-2 Conv1D) only, not to {kind}")
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={module.groups}) is not supported")
        ones = (1,) * len(module.kernel_size)
        shapes = {"lora_A": (spec.r, module.in_channels, *module.kernel_size), "lora_B": (d_out, spec.r, *ones)}
    elif spec.enabled is not None:
        n_on = sum(spec.enabled)
        shapes = {"lora_A": (n_on * spec.r, d_in), "lora_B": (n_on, d_out // len(spec.enabled), spec.r)}
    else:
        shapes = {"lora_A": (spec.r, d_in), "lora_B": (d_out, spec.r)}
    if spec.lora_bias:
        shapes["lora_B_bias"] = (d_out,)
    return shapes


#: (predicate on the base module, mixin, fan_in_fan_out). A new layer type is one entry here.
LAYER_REGISTRY: list[tuple[Callable[[nn.Module], bool], type[LoraLayer], bool]] = [
    (lambda m: isinstance(m, nn.Linear), LoraLinearMixin, False),
    (is_conv1d_gpt2, LoraLinearMixin, True),
    (lambda m: isinstance(m, nn.Embedding), LoraEmbeddingMixin, False),
    (lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(m, nn.modules.conv._ConvTransposeNd), LoraConvMixin, False),
]

_LORA_CLASSES: dict[type, type] = {}


def supports(module: nn.Module) -> bool:
    """Whether lorakit can put LoRA on this module."""
    return isinstance(module, LoraLayer) or any(pred(module) for pred, _, _ in LAYER_REGISTRY)


def lora_class_for(base_cls: type, module: nn.Module) -> type:
    """The LoRA subclass of `base_cls` (created once per base class, cached)."""
    if base_cls in _LORA_CLASSES:
        return _LORA_CLASSES[base_cls]
    for pred, mixin, fan_in_fan_out in LAYER_REGISTRY:
        if pred(module):
            name = f"Lora{base_cls.__name__}"
            cls = type(name, (mixin, base_cls), {"fan_in_fan_out": fan_in_fan_out, "__module__": __name__})
            cls.__qualname__ = name
            globals().setdefault(name, cls)  # importable by name, so pickling works
            _LORA_CLASSES[base_cls] = cls
            return cls
    raise TypeError(f"lorakit has no LoRA layer for {base_cls.__name__}")


def attach(module: nn.Module) -> LoraLayer:
    """Turn `module` into its LoRA layer in place (same object, same parameters)."""
    if isinstance(module, LoraLayer):
        return module
    base_cls = type(module)
    module.__class__ = lora_class_for(base_cls, module)
    module._lora_base_class = base_cls
    module._lora_setup()
    return module  # type: ignore[return-value]


def detach(module: LoraLayer) -> nn.Module:
    """Drop every adapter's tensors and give the module back its original class."""
    for name in ("lora_A", "lora_B", "lora_B_bias"):
        delattr(module, name)
    for name in ("lora_w0", "lora_b0"):  # exact copies of W0 kept while merged
        module._buffers.pop(name, None)
    for name in ("_lora_mixed_cache", "_lora_infer_cache"):  # copies of A, B
        module.__dict__.pop(name, None)
    for name in ("lora_specs", "active_adapters", "merged_adapters", "lora_disabled"):
        module.__dict__.pop(name, None)
    module.__class__ = module.__dict__.pop("_lora_base_class")
    return module
