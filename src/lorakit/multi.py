"""Many tasks on one base model: mixed-adapter batches and combining adapters.

`mixed_batch` lets row i of a batch use its own adapter (S-LoRA/Punica's idea): per layer the
adapters' A and B are stacked once (ranks zero-padded to the largest), gathered per row and
applied with two batched matrix products, so a batch over N adapters costs two `bmm`s per layer,
never a forward per adapter and never a Python loop over rows.

`combine_adapters` builds a new adapter from weighted existing ones ("cat", "linear", "svd").
Every source's own scale (alpha/r or rsLoRA's alpha/√r) is folded into its B and the result
gets scale 1 (alpha = r, no rsLoRA), so mixed scaling rules cannot go wrong.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .functional import expand_sliced_B
from .layers import LoraLayer, LoraSpec, lora_math_dtype, skinny, tensor_fingerprint
from .saved import wrappers
from .state import AdapterRecord, check_adapter_name, check_not_mixed, get_state, lora_layers

COMBINE_METHODS = ("cat", "linear", "svd")


# ---- mixed batches -------------------------------------------------------------------------------

def _layer_stacks(layer: LoraLayer, used: set[str]) -> tuple[dict[str, int], Tensor, Tensor, Tensor | None]:
    """(slot of each adapter, A, (scale·B)ᵀ, bias) of all the layer's adapters, stacked once.

    Slot 0 is all zeros (the base model). A: (S, r_max, d_in) (an embedding's Aᵀ: (S,
    num_embeddings, r_max)), (scale·B)ᵀ: (S, r_max, d_out), ranks zero-padded, in the layer's dtype,
    laid out so a gather by slot feeds `bmm` directly. Kept on the layer (``_lora_mixed_cache``):
    rebuilt when an adapter is added or removed, or the layer's dtype changes; the slots of the `used`
    adapters (this batch's rows) are refreshed where their tensors changed (`tensor_fingerprint`). So
    entering a mixed batch costs no copies, and its check grows with the adapters in the batch, not on the model.
    """
    key = (layer.weight.dtype, layer.weight.device, tuple(layer.lora_specs.items()))
    cached = layer.__dict__.get("_lora_mixed_cache")
    if cached is None or cached[0] != key:
        cached = (key, _build_stacks(layer), {})
        layer.__dict__["_lora_mixed_cache"] = cached
    stacks, seen = cached[1], cached[2]
    for name in used:
        if name in layer.lora_specs:
            fingerprint = _adapter_fingerprint(layer, name)
            if seen.get(name) != fingerprint:
                _fill_slot(layer, stacks, name)
                seen[name] = fingerprint
    return stacks


def _build_stacks(layer: LoraLayer) -> tuple[dict[str, int], Tensor, Tensor, Tensor | None]:
    """Zeroed stacks with a slot per adapter (see `_layer_stacks`); `_fill_slot` writes an adapter into its slot."""
    names = list(layer.lora_specs)
    d_out, d_in = _io_dims(layer)
    dtype = layer.weight.dtype if layer.weight.dtype.is_floating_point else torch.float32
    device = layer.weight.device
    r_max = max([layer.lora_A[n].shape[0] for n in names], default=1)
    with torch.inference_mode(False):  # plain tensors, usable outside inference mode too
        A_all = torch.zeros(len(names) + 1, r_max, d_in, dtype=dtype, device=device)
        if layer.is_embedding:  # (S, num_embeddings, r): row i's A at its token ids
            A_all = A_all.transpose(1, 2).contiguous()
        B_all = torch.zeros(len(names) + 1, r_max, d_out, dtype=dtype, device=device)
        bias = None
        if any(n in layer.lora_B_bias for n in names):
            bias = torch.zeros(len(names) + 1, d_out, dtype=dtype, device=device)
    return {n: i for i, n in enumerate(names, start=1)}, A_all, B_all, bias


@torch.no_grad()
def _fill_slot(layer: LoraLayer, stacks: tuple[dict[str, int], Tensor, Tensor, Tensor | None], name: str) -> None:
    """Write adapter `name`'s current A, scale·Bᵀ and bias into its slot of `stacks` (rank padding left zero)."""
    slot_of, A_all, B_all, bias = stacks
    i = slot_of[name]
    A, B = _dense(layer, name)
    with torch.inference_mode(False):
        if layer.is_embedding:
            A_all[i, :, : A.shape[0]] = A.t()
        else:
            A_all[i, : A.shape[0]] = A
        B_all[i, : B.shape[1]] = B.t()
        if bias is not None and name in layer.lora_B_bias:
            bias[i] = layer.scaled_lora_bias(name).detach()


def _adapter_fingerprint(layer: LoraLayer, name: str) -> tuple:
    """Fingerprints of adapter `name`'s tensors on `layer`: its slot is stale when they change.

    Read from the parameter dicts directly: it runs for every layer and every adapter of the batch each
    time a mixed batch is entered (ParameterDict lookups cost ~3x as much).
    """
    As, Bs, biases = (layer._modules[k]._parameters for k in ("lora_A", "lora_B", "lora_B_bias"))
    bias = biases.get(name)
    return (*tensor_fingerprint(As[name]), *tensor_fingerprint(Bs[name]), *(tensor_fingerprint(bias) if bias is not None else ()))


def _dense(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor]:
    """(A (r, d_in), scale·B (d_out, r)) of adapter `name`, fused slices made dense, a scaled embedding's factor folded in."""
    spec = layer.lora_specs[name]
    A, B = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    if spec.enabled is not None:
        B = expand_sliced_B(B, list(spec.enabled))
    factor = layer.output_factor() if layer.is_embedding else None
    if factor is not None:  # a scalar, or one factor per output feature
        B = B * factor.to(B.dtype).reshape(-1, 1)
    return A, B * spec.scale


class _RowAdapters:
    """A forward hook that adds row i's adapter update from its layer's stacks.

    `slots`: (batch,) stack slot of each row (0: base model, or an adapter not on this layer), one
    tensor shared by every layer with the same slots (`slot_tensors`).
    """

    def __init__(self, path: str, layer: LoraLayer, rows: list[str | None], in_generate: list[bool], slot_tensors: dict) -> None:
        self.path = path
        self.in_generate = in_generate  # shared flag: True while the model's generate runs
        slot_of, self.A, self.B, self.bias = _layer_stacks(layer, set(rows))
        slots = tuple(slot_of.get(n, 0) for n in rows)
        device = layer.weight.device
        if (slots, device) not in slot_tensors:
            slot_tensors[slots, device] = torch.tensor(slots, dtype=torch.long, device=device)
        self.slots = slot_tensors[slots, device]
        self.embedding = layer.is_embedding
        self.kept_rows: tuple | None = None  # (key, per-row factors) reused by the next calls, see `_rows`

    def _row_slots(self, n: int) -> Tensor:
        """Slots for a batch of `n` rows; inside ``generate``, num_beams / num_return_sequences repeat each row."""
        b = self.slots.shape[0]
        if n == b:
            return self.slots
        if n % b or not self.in_generate[0]:
            raise ValueError(
                f"mixed_batch was given {b} adapter names but layer {self.path!r} got a batch of {n} rows: pass one "
                "name per row (only model.generate may repeat rows, for beams and num_return_sequences). If that layer "
                "sees the tokens flattened, routed (a mixture-of-experts block) or sequence-first, rows cannot be told apart there: "
                "leave it out of the adapters (exclude_modules) to serve them in mixed batches"
            )
        return self.slots.repeat_interleave(n // b)

    def _rows(self, slots: Tensor, dtype: torch.dtype, math_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-row A (n, r, d_in) (an embedding: its whole stack), (scale·B)ᵀ (n, r, d_out), bias (n, 1, d_out).

        Rounded to the activations' `dtype` (as the one-adapter path rounds them), held in `math_dtype`.
        Kept for the block's next calls with as many rows (generate's decode steps, where the gather
        costs more than the one-token products) while no larger than twice the layer's stacks;
        otherwise gathered per call.
        """
        key = (slots.shape[0], dtype, math_dtype)
        if self.kept_rows is not None and self.kept_rows[0] == key:
            return self.kept_rows[1]
        A = self.A if self.embedding else self.A.index_select(0, slots)
        B = self.B.index_select(0, slots)  # index_select: ~3x faster than B[slots]
        bias = self.bias.index_select(0, slots).unsqueeze(1) if self.bias is not None else None
        rows = tuple(t.to(dtype).to(math_dtype) if t is not None else None for t in (A, B, bias))
        if self._fits(rows):
            self.kept_rows = (key, rows)
        return rows

    def _fits(self, rows: tuple[Tensor, Tensor, Tensor | None]) -> bool:
        """Whether keeping `rows` costs at most twice the layer's stacks (with bf16 stacks: fp32 rows for as many rows as slots)."""
        stacks = sum(t.numel() * t.element_size() for t in (self.A, self.B, self.bias) if t is not None)
        kept = sum(t.numel() * t.element_size() for t in rows if t is not None and t is not self.A)
        return kept <= 2 * stacks

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        if module.training and torch.is_grad_enabled():
            raise RuntimeError(
                "mixed_batch is for inference: its per-row adapter copies carry no gradient to A and B, and LoRA "
                "dropout is off. Call model.eval() and run under torch.no_grad(); to train, use set_adapter"
            )
        x = args[0]
        b = x.shape[0]
        slots = self._row_slots(b)
        if self.embedding:
            A, B, bias = self._rows(slots, out.dtype, out.dtype)
            h = A[slots.view(-1, *([1] * (x.dim() - 1))), x]  # (b, ..., r): row i's A at its token ids
            h = h.reshape(b, -1, h.shape[-1])
            dtype = out.dtype
        else:
            dtype = lora_math_dtype(x)  # fp32 at decode steps of a bf16 model, as the one-adapter path
            A, B, bias = self._rows(slots, x.dtype, dtype)
            h = skinny(x.reshape(b, -1, x.shape[-1]).to(dtype), A)  # (b, T, r_max): row i's x·Aᵢᵀ, batched
        out3 = out.reshape(b, -1, out.shape[-1])
        recording = torch.is_grad_enabled() and out.requires_grad
        if dtype != out.dtype:  # the fp32 update added and rounded once
            y = torch.add(out3, torch.bmm(h, B)).to(out.dtype) if recording else out3.add_(torch.bmm(h, B))
        else:  # out + row i's B·A·x in one pass; written into the base output when no graph needs it unchanged
            y = torch.baddbmm(out3, h, B) if recording else out3.baddbmm_(h, B)
        if bias is not None:
            y = y + bias.to(out.dtype)
        return y.view(out.shape)


def _io_dims(layer: LoraLayer) -> tuple[int, int]:
    """(d_out, d_in) of the LoRA update as A and B see it (embedding: (dim, num_embeddings))."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        raise ValueError(
            f"mixed_batch supports linear and embedding LoRA layers, not {layer._lora_base_class.__name__}; "
            "use set_adapter for convolutional adapters"
        )
    return layer.base_shape()


@contextlib.contextmanager
def _flag_during_generate(model: nn.Module, flag: list[bool], rows: int) -> Iterator[None]:
    """Set ``flag[0]`` while ``model.generate`` runs (the only caller allowed to repeat rows: for beams and
    ``num_return_sequences``, not for an input of another batch size than the `rows` names)."""
    generate = getattr(model, "generate", None)
    if not callable(generate):
        yield
        return
    own = model.__dict__.get("generate")  # an instance attribute the user set: restore it after

    def flagged(*args, **kwargs):
        inputs = args[0] if args else next((kwargs[k] for k in ("inputs", "input_ids", "inputs_embeds")
                                            if kwargs.get(k) is not None), None)
        if isinstance(inputs, Tensor) and inputs.dim() > 1 and inputs.shape[0] != rows:
            raise ValueError(f"mixed_batch was given {rows} adapter names but generate got {inputs.shape[0]} input rows: "
                             "pass one name per row (beams and num_return_sequences repeat each row's adapter by themselves)")
        flag[0] = True
        try:
            return generate(*args, **kwargs)
        finally:
            flag[0] = False

    model.__dict__["generate"] = flagged
    try:
        yield
    finally:
        if own is None:
            model.__dict__.pop("generate", None)
        else:
            model.__dict__["generate"] = own


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch uses adapter ``adapters[i]`` (None: the base model).

    Works through ``model.generate`` (rows keep their adapter at every decoding step, with a KV
    cache; beams repeat their row's adapter). A module an adapter trains whole (``modules_to_save``)
    runs on each row as that row's adapter has it. Merged adapters are unmerged for the block and
    merged back after; the active adapters are ignored inside it. Inference only: no gradients reach A, B.
    Row i is index i of the first dimension of every adapted layer's input (batch-first, as in
    transformers); a sequence-first layer would see time steps as rows.
    """
    state = get_state(model)
    check_not_mixed(model, "open another mixed_batch")
    if isinstance(adapters, str):
        raise ValueError(f"mixed_batch takes one adapter name (or None) per row, e.g. [{adapters!r}, None]; got the string {adapters!r}")
    rows = list(adapters)
    if not rows:
        raise ValueError("mixed_batch needs one adapter name (or None) per batch row; got an empty list")
    unknown = sorted({n for n in rows if n is not None and n not in state.adapters})
    if unknown:
        raise ValueError(f"mixed_batch: no adapter named {unknown}; this model has {list(state.adapters)} (or None for the base)")
    changed = {p: n for n, record in state.adapters.items() for p in record.base_values}
    for row in dict.fromkeys(rows):
        lacking = [p for p in changed if row is None or p not in state.adapters[row].base_values]
        if lacking:
            raise ValueError(
                f"adapter {changed[lacking[0]]!r} changed the base model's {lacking[0]!r} (a trained bias, or a base "
                f"weight loaded from its file), which rows cannot hold per row, so row adapter {row!r} would see it; "
                f"give every row an adapter that holds it ({sorted({changed[p] for p in changed})}), or use "
                "disable_adapters for base rows"
            )
    paths = dict(lora_layers(model))
    layers = list(paths.values())
    in_generate, slot_tensors = [False], {}
    with torch.no_grad():  # hooks only where some row's adapter is (a conv adapter no row uses is no obstacle)
        stacks = {id(layer): _RowAdapters(path, layer, rows, in_generate, slot_tensors) for path, layer in paths.items()
                  if any(n in layer.lora_specs for n in rows if n is not None)}
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    disabled = {id(layer): layer.lora_disabled for layer in layers}
    heads = wrappers(model)
    handles = []
    state.open_block = "mixed_batch"
    try:
        for head in heads:  # modules_to_save: each row through its adapter's copy
            head.rows = rows
        for layer in layers:
            layer.set_merged([])
            layer.lora_disabled = True  # the hook adds the per-row update instead
            if id(layer) in stacks:
                handles.append(layer.register_forward_hook(stacks[id(layer)]))
        with _flag_during_generate(model, in_generate, len(rows)):
            yield model
    finally:
        state.open_block = None
        for head in heads:
            head.rows = None
        for handle in handles:
            handle.remove()
        for layer in layers:
            layer.lora_disabled = disabled[id(layer)]
            layer.set_merged(merged[id(layer)])


# ---- combining -----------------------------------------------------------------------------------

def _source_factors(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor]:
    """(A (r, ...), scale·B (d_out, r, ...)) in fp32, fused slices as the equivalent dense B."""
    spec = layer.lora_specs[name]
    A, B = layer.lora_A[name].detach().float(), layer.lora_B[name].detach().float()
    if spec.enabled is not None:
        B = expand_sliced_B(B, list(spec.enabled))
    return A, B * spec.scale


def _combine_layer(
    layer: LoraLayer, weights: dict[str, float], method: str, rank: int | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(A, B, bias) of the combined adapter on one layer, scale 1."""
    names = [n for n in weights if n in layer.lora_specs]
    factors = {n: _source_factors(layer, n) for n in names}
    if method == "cat":  # exact: Σ w_i·s_i·B_i·A_i = [w_1 s_1 B_1 | w_2 s_2 B_2] · [A_1; A_2]
        A = torch.cat([factors[n][0] for n in names], dim=0)
        B = torch.cat([factors[n][1] * weights[n] for n in names], dim=1)
    elif method == "linear":  # PEFT's: c_i = w_i·s_i; A = Σ sign(c_i)·√|c_i|·A_i, B = Σ √|c_i|·B_i; same ranks only
        ranks = {n: layer.lora_specs[n].r for n in names}
        if len(set(ranks.values())) > 1:
            raise ValueError(f"method='linear' needs equal ranks, got {ranks}; use method='cat' (exact) or 'svd'")
        slices = {n: layer.lora_specs[n].enabled for n in names}
        if len(set(slices.values())) > 1:
            raise ValueError(f"method='linear' needs the same fused slices on every adapter, got {slices}; "
                             "use method='cat' (exact) or 'svd'")
        coef = {n: weights[n] * layer.lora_specs[n].scale for n in names}
        A = sum(math.copysign(math.sqrt(abs(coef[n])), coef[n]) * factors[n][0] for n in names)
        B = sum(math.sqrt(abs(coef[n])) / layer.lora_specs[n].scale * factors[n][1] for n in names)  # factors hold s·B
    else:  # svd: best rank-`rank` fit of Σ w_i ΔW_i, split as B = U√S, A = √S·Vh
        A0 = factors[names[0]][0]
        delta = sum(weights[n] * (factors[n][1].flatten(1) @ factors[n][0].flatten(1)) for n in names)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        # Σ w_i ΔW_i has rank ≤ Σ r_i (and the layer's size): a larger rank would only add zero singular values
        r = min(rank or max(factors[n][0].shape[0] for n in names), S.shape[0], sum(factors[n][0].shape[0] for n in names))
        root = S[:r].sqrt()
        A = (root[:, None] * Vh[:r]).reshape(r, *A0.shape[1:])
        B = (U[:, :r] * root).reshape(U.shape[0], r, *factors[names[0]][1].shape[2:])
    bias = None
    if any(n in layer.lora_B_bias for n in names):
        bias = sum(
            layer.scaled_lora_bias(n).detach().float() * weights[n]
            for n in names
            if n in layer.lora_B_bias
        )
    return A, B, bias


def combine_adapters(
    model: nn.Module,
    weights: dict[str, float],
    name: str,
    method: str = "cat",
    rank: int | None = None,
) -> nn.Module:
    """Add adapter `name` with ΔW = Σ w_i·ΔW_i over the adapters in `weights`; returns `model`.

    - ``"cat"``: exact; ranks add up (A's stacked, weighted scaled B's side by side).
    - ``"linear"``: PEFT's weighted sum of the A's and of the B's, √|w_i·s_i| each (the sign on A);
      equal ranks only; not the weighted sum of the updates in general (the product adds cross
      terms B_i·A_j). (PEFT's own result is off by √r when its first source uses rsLoRA: it
      keeps that flag with alpha = r.)
    - ``"svd"``: the best rank-`rank` approximation (default: the largest source rank) of the
      exact sum, by truncated SVD per layer.
    The new adapter has scale 1 (alpha = r, no rsLoRA) and is not activated: ``set_adapter`` it.
    """
    state = get_state(model)
    check_adapter_name(name)
    check_not_mixed(model, "combine adapters")
    if method not in COMBINE_METHODS:
        raise ValueError(f"method must be one of {COMBINE_METHODS}, got {method!r}")
    if not weights:
        raise ValueError("combine_adapters needs at least one adapter in weights, e.g. {'a': 0.5, 'b': 0.5}")
    unknown = [n for n in weights if n not in state.adapters]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; this model has {list(state.adapters)}")
    if name in state.adapters:
        raise ValueError(f"adapter {name!r} already exists; pick another name or delete_adapter it first")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank is not None and method != "svd":
        raise ValueError(f"rank applies to method='svd' only ({method!r} fixes the rank itself); leave it out or use 'svd'")
    extras = [n for n in weights if state.adapters[n].saved_modules or state.adapters[n].bias_params]
    if extras:
        raise ValueError(
            f"adapters {extras} train whole modules (modules_to_save) or biases, which have no low-rank update "
            "to add up; combine adapters that hold only A and B"
        )
    bad = {n: w for n, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)}
    if bad:
        raise ValueError(f"combine_adapters weights must be finite numbers, got {bad}")
    weights = {n: float(w) for n, w in weights.items()}
    computed: list[tuple[str, LoraLayer, Tensor, Tensor, Tensor | None]] = []
    for path, layer in lora_layers(model):
        if any(n in layer.lora_specs for n in weights):
            computed.append((path, layer, *_combine_layer(layer, weights, method, rank)))
    short = [(path, A.shape[0]) for path, _, A, _, _ in computed if rank is not None and A.shape[0] < rank]
    if short:
        warnings.warn(f"rank={rank} is more than the combined update has on {len(short)} layer(s) (e.g. {short[0][0]}: "
                      f"{short[0][1]}, the sources' ranks added up or the layer's size); they get that rank, which is "
                      "exact", stacklevel=2)
    lora_bias = any(bias is not None for *_, bias in computed)
    ranks = [A.shape[0] for _, _, A, _, _ in computed]
    r0 = max(set(ranks), key=ranks.count)
    exact = {re.escape(path): A.shape[0] for path, _, A, _, _ in computed if A.shape[0] != r0}
    config = LoraConfig(
        r=r0, alpha=r0, target_modules=[path for path, *_ in computed], rank_pattern=exact,
        alpha_pattern=dict(exact), lora_bias=lora_bias,
        base_model_name_or_path=state.adapters[next(iter(weights))].config.base_model_name_or_path,
    )
    added: list[LoraLayer] = []
    try:
        with torch.no_grad():
            for _, layer, A, B, bias in computed:
                layer.add_adapter(name, LoraSpec(r=A.shape[0], alpha=float(A.shape[0]), lora_bias=lora_bias))
                added.append(layer)
                dtype = layer.lora_A[name].dtype
                layer.lora_A[name].copy_(A.to(dtype))
                layer.lora_B[name].copy_(B.to(dtype))
                if lora_bias and bias is not None:
                    layer.lora_B_bias[name].copy_(bias.to(dtype))
    except Exception:
        for layer in added:
            layer.remove_adapter(name)
        raise
    state.adapters[name] = AdapterRecord(config=config, layers=[path for path, *_ in computed])
    for layer in added:  # not active, not trained (add_adapter made it both); every other flag as it was
        layer.active_adapters = [n for n in layer.active_adapters if n != name]
        for store in (layer.lora_A, layer.lora_B, layer.lora_B_bias):
            if name in store:
                store[name].requires_grad_(False)
    return model
