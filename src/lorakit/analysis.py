"""The paper's analyses of a learned update ΔW = scale·B·A (Hu et al. 2022, Sec. 7).

- `subspace_similarity`: φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) over the right-singular
  vectors of two A matrices (Sec. 7.2, Figures 3 and 4); 1 = one subspace contains the other, 0 = orthogonal.
- `amplification`: how much ΔW amplifies directions of W (Sec. 7.3, Table 7).
- `singular_spectrum`, `effective_rank`, `numerical_rank`: how many directions ΔW really uses.

`adapter_updates` reads these per layer from an adapter folder; `analyze` / `write_report` turn one or
two folders (and optionally the base model) into tables and PNG figures (``lorakit analyze``).
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapters import PREFIX
from .checkpoint import atomic_write_bytes, read_adapter
from .functional import lora_scale
from .layers import is_conv1d_gpt2
from .state import check_module

log = logging.getLogger(__name__)

# ---- the math ----------------------------------------------------------------------------------------


def right_singular_vectors(A: Tensor) -> Tensor:
    """Orthonormal rows spanning A's row space, strongest first: Vh of A = U·S·Vh, A: (r, k) -> (r, k)."""
    _, _, Vh = torch.linalg.svd(A.detach().flatten(1).double(), full_matrices=False)
    return Vh


def _matrix(x: Tensor, name: str) -> Tensor:
    """`x` as a tensor of at least 2 dims with finite values (numpy arrays accepted), or a ValueError naming `name`."""
    x = torch.as_tensor(x)
    if x.dim() < 2:
        raise ValueError(f"{name} must be a matrix (r, k) or a conv weight, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf values: nothing to decompose")
    return x


def subspace_similarity(A1: Tensor, A2: Tensor) -> Tensor:
    """φ[i-1, j-1] = ‖V1[:i] V2[:j]ᵀ‖²_F / min(i, j) for all i ≤ r1, j ≤ r2 (the paper's Eq. in Sec. 7.2).

    A1: (r1, k), A2: (r2, k) (conv A's are flattened) -> (r1, r2) in [0, 1]; a rank above k counts as k
    (A has at most k independent rows).
    """
    A1, A2 = _matrix(A1, "A1"), _matrix(A2, "A2")
    for name, A in (("A1", A1), ("A2", A2)):
        if not A.abs().max() > 0:
            raise ValueError(f"{name} is all zeros: it spans no subspace to compare (an adapter whose A is 0 learned "
                             "nothing there); leave that layer out")
    if A1.flatten(1).shape[1] != A2.flatten(1).shape[1]:
        raise ValueError(
            f"A matrices act on different input sizes ({A1.flatten(1).shape[1]} vs {A2.flatten(1).shape[1]}): "
            "compare adapters of the same layer of the same base model"
        )
    overlap = (right_singular_vectors(A1) @ right_singular_vectors(A2).T) ** 2  # (r1, r2)
    cum = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, cum.shape[0] + 1, dtype=cum.dtype)[:, None]
    j = torch.arange(1, cum.shape[1] + 1, dtype=cum.dtype)[None, :]
    return (cum / torch.minimum(i, j)).clamp(0.0, 1.0).float()


def row_space(delta: Tensor, r: int) -> Tensor:
    """The top-r right-singular directions of ΔW, scaled by their singular values: (r, k), rows strongest first.

    ``subspace_similarity(row_space(ΔW1, r1), row_space(ΔW2, r2))`` compares what two updates read from the
    input, which after short training is clearer than A alone (A keeps most of its random initialisation).
    """
    _, S, Vh = torch.linalg.svd(delta.detach().flatten(1).double(), full_matrices=False)
    return S[:r, None] * Vh[:r]


def factored_svd(B: Tensor, A: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ΔW = scale·B·A from its factors, in fp64: (U (d, r), S (r,), Vh (r, k)).

    B = Q_B·R_B and Aᵀ = Q_A·R_A give ΔW = Q_B·(scale·R_B·R_Aᵀ)·Q_Aᵀ, so only an r×r matrix is
    decomposed: O((d + k)·r²) instead of O(d·k·min(d, k)) for the dense ΔW. B: (d, r[, 1..]), A: (r, k[, ..]).
    """
    if B.flatten(1).shape[1] != A.shape[0]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} do not share a rank: pass B (d, r) and A (r, k)")
    Qb, Rb = torch.linalg.qr(B.detach().flatten(1).double())
    Qa, Ra = torch.linalg.qr(A.detach().flatten(1).double().T)
    U, S, Vh = torch.linalg.svd(scale * (Rb @ Ra.T), full_matrices=False)  # min(d, k, r) directions
    return Qb @ U, S, Vh @ Qa.T


def singular_spectrum(delta: Tensor) -> Tensor:
    """Singular values of ΔW (flattened to 2-D), largest first, in fp32."""
    return torch.linalg.svdvals(_matrix(delta, "delta").detach().flatten(1).double()).float()


def effective_rank(x: Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(σ/Σσ)) of a matrix, or of its singular values (1-D input).

    Equals k for k equal non-zero singular values; 0 for the zero matrix.
    """
    x = torch.as_tensor(x)
    if x.dim() == 0:
        raise ValueError("effective_rank takes a matrix or its 1-D singular values, got a scalar")
    if not torch.isfinite(x).all():
        raise ValueError("effective_rank: the input holds NaN or inf values")
    if x.dim() == 1 and bool((x < 0).any()):
        raise ValueError("effective_rank: singular values are >= 0, and these hold negative values; pass the matrix "
                         "itself, or torch.linalg.svdvals of it")
    s = x.double() if x.dim() == 1 else singular_spectrum(x).double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


@dataclass(frozen=True)
class Amplification:
    """One row block of the paper's Table 7 for one layer: Frobenius norms and the amplification factor."""

    r: int
    delta_norm: float  # ‖ΔW‖_F
    weight_norm: float  # ‖W‖_F
    proj_delta: float  # ‖UᵀWVᵀ‖_F, U, V: ΔW's top-r singular vectors
    proj_weight: float  # same with W's own top-r singular vectors
    proj_random: float  # same with a random r-dimensional subspace

    @property
    def factor(self) -> float:
        """‖ΔW‖_F / ‖UᵀWVᵀ‖_F with ΔW's directions: how much ΔW amplifies what W already has there."""
        return self.delta_norm / self.proj_delta if self.proj_delta > 0 else math.inf


def _project(W: Tensor, U: Tensor, Vh: Tensor) -> float:
    return float(torch.linalg.matrix_norm(U.T @ W @ Vh.T))


def numerical_rank(S: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    """How many singular values `S` (all of them, largest first) of a (d, k) matrix given in `dtype` exceed round-off.

    Round-off is the larger of two bounds: the SVD's own, σ₁·max(d, k)·eps (`torch.linalg.matrix_rank`'s, with
    eps at most fp32's: the SVD runs in fp64), and the rounding of the matrix's entries to `dtype`, which moves
    every singular value by at most ‖E‖₂ ≤ ‖E‖_F ≤ ‖·‖_F·eps/2 (Weyl). So a bf16 rank-8 update B·A has rank 8
    unless a direction is weaker than ‖ΔW‖_F·2⁻⁷; a matrix formed in low precision some other way (merged −
    base weights) carries more rounding than that, and needs its rank given. 0 only for the zero matrix.
    """
    if S.dim() != 1:
        raise ValueError(f"numerical_rank takes the 1-D singular values of a matrix (torch.linalg.svdvals(M)), "
                         f"not a tensor of shape {tuple(S.shape)}")
    if S.numel() == 0 or S[0] <= 0:
        return 0
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
    tol = max(float(S[0]) * max(shape) * min(eps, torch.finfo(torch.float32).eps), float(S.norm()) * eps)
    return max(1, int((tol < S).sum()))


def amplification(W: Tensor, delta: Tensor, r: int | None = None, seed: int = 0) -> Amplification:
    """Project W onto ΔW's top-r singular subspaces, W's own and a random one (Sec. 7.3, Table 7).

    W, ΔW: (d, k) in the same orientation (conv weights are flattened), any dtype (computed in fp64). `r`
    defaults to ΔW's `numerical_rank` at the precision of ΔW's dtype; pass it for a low-precision ΔW formed
    as the difference of two weights (its rounding error is W's, far above ΔW's own).
    """
    W, delta = _matrix(W, "W"), _matrix(delta, "ΔW")
    W64, D64 = W.detach().flatten(1).double(), delta.detach().flatten(1).double()
    if W64.shape != D64.shape:
        raise ValueError(f"W has shape {tuple(W64.shape)} but ΔW has {tuple(D64.shape)}: pass the matching base weight")
    svd = torch.linalg.svd(D64, full_matrices=False)
    if r is None:
        r = numerical_rank(svd.S, D64.shape, delta.dtype)
        if r == 0:
            raise ValueError("ΔW is zero (B = 0: an untrained adapter), so it amplifies nothing")
    return _amplification(W64, svd, r, seed)


def _amplification(W64: Tensor, delta_svd: tuple[Tensor, Tensor, Tensor], r: int, seed: int = 0) -> Amplification:
    """`amplification` from W (fp64, 2-D) and ΔW's thin SVD (U, S, Vh)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r <= min(W64.shape):
        raise ValueError(f"r must be an integer in [1, {min(W64.shape)}] for a {tuple(W64.shape)} weight, got {r!r}")
    r = int(r)
    Ud, Sd, Vd = delta_svd
    Uw, _, Vw = torch.linalg.svd(W64, full_matrices=False)
    g = torch.Generator().manual_seed(seed)
    Ur = torch.linalg.qr(torch.randn(W64.shape[0], r, generator=g, dtype=torch.float64)).Q
    Vr = torch.linalg.qr(torch.randn(W64.shape[1], r, generator=g, dtype=torch.float64)).Q.T
    return Amplification(
        r=r,
        delta_norm=float(Sd.norm()),  # ‖ΔW‖_F = ‖σ‖₂
        weight_norm=float(torch.linalg.matrix_norm(W64)),
        proj_delta=_project(W64, Ud[:, :r], Vd[:r]),
        proj_weight=_project(W64, Uw[:, :r], Vw[:r]),
        proj_random=_project(W64, Ur, Vr),
    )


# ---- adapters on disk -----------------------------------------------------------------------------


@dataclass
class LayerUpdate:
    """One adapted layer of a saved adapter: A (r, d_in[, kernel]), B (d_out, r[, 1..]) and the scale."""

    A: Tensor
    B: Tensor
    scale: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        """r, capped at min(d_out, d_in): a larger r adds no directions."""
        return min(self.A.shape[0], *self.shape)

    @property
    def delta(self) -> Tensor:
        """ΔW = scale·B·A as (d_out, d_in·kernel) in fp32, the paper's orientation."""
        return (self.B.float().flatten(1) @ self.A.float().flatten(1)) * self.scale

    @property
    def shape(self) -> tuple[int, int]:
        """ΔW's shape (d_out, d_in·kernel), without forming ΔW."""
        return self.B.flatten(1).shape[0], self.A.flatten(1).shape[1]

    @functools.cached_property
    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD of ΔW from the factors (`factored_svd`), computed once."""
        return factored_svd(self.B, self.A, self.scale)

    @property
    def delta_rank(self) -> int:
        """ΔW's `numerical_rank`: at most `rank`, below it when B·A is rank-deficient, 0 when ΔW = 0."""
        return numerical_rank(self.svd[1], self.shape)

    @property
    def row_space(self) -> Tensor:
        """`row_space` (ΔW, delta_rank) from the factored SVD: ΔW's non-zero right-singular directions scaled by σ."""
        _, S, Vh = self.svd
        r = self.delta_rank
        return S[:r, None] * Vh[:r]


@dataclass
class AdapterInfo:
    """A saved adapter folder read for analysis: per-layer updates by module path, and its base model."""

    path: str
    base: str | None
    layers: dict[str, LayerUpdate] = field(default_factory=dict)


def adapter_updates(path: str | os.PathLike) -> AdapterInfo:
    """Read an adapter folder (lorakit's or PEFT's) into per-layer A, B and scale, keyed by module path.

    A fused projection adapted slice by slice (GPT-2's ``c_attn`` on q and v) gives one entry per adapted
    slice, ``<path>[q]`` / ``<path>[v]``, as the paper analyses Wq and Wv.
    """
    fields, tensors, cfg = read_adapter(path)
    info = AdapterInfo(str(path), fields.get("base_model_name_or_path") or cfg.base_model_name_or_path)
    slots = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "eA", ".lora_embedding_B": "eB"}
    found: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        for suffix, slot in slots.items():
            if key.endswith(suffix):
                found.setdefault(key[len(PREFIX) if key.startswith(PREFIX) else 0 : -len(suffix)], {})[slot] = t
    for mpath, parts in sorted(found.items(), key=lambda kv: _natural_key(kv[0])):
        A, B = parts.get("A", parts.get("eA")), parts.get("B", parts.get("eB"))
        if A is None or B is None:
            raise ValueError(f"adapter {path} has only one of lora_A / lora_B for {mpath}: the file is incomplete")
        r, slices = cfg.rank_for(mpath), cfg.slices_for(mpath)
        rows = r * (sum(slices) if slices else 1)  # a fused layer's file holds n_on·r rows
        if A.shape[0] != rows or B.flatten(1).shape[1] != rows:
            raise ValueError(
                f"adapter {path}: {mpath} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, but its config says "
                f"rank {rows}: the config and the weights disagree (lorakit.load_adapter refuses it too); fix adapter_config.json"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"adapter {path}: {mpath} holds NaN or inf values (training diverged?): nothing to analyse there")
        scale = lora_scale(cfg.alpha_for(mpath), r, cfg.use_rslora)
        A, B = A.float(), B.float()
        if not slices:
            info.layers[mpath] = LayerUpdate(A, B, scale, embedding="eA" in parts)
            continue
        d_slice = B.shape[0] // len(slices)
        on = [i for i, flag in enumerate(slices) if flag]
        for j, i in enumerate(on):  # slice i's update is B[rows of i, columns of j]·A[rows of j]
            info.layers[slice_path(mpath, i, len(slices))] = LayerUpdate(
                A[j * r : (j + 1) * r], B[i * d_slice : (i + 1) * d_slice, j * r : (j + 1) * r], scale
            )
    if not info.layers:
        raise ValueError(f"adapter {path} holds no LoRA A/B tensors to analyse")
    return info


_SLICE = re.compile(r"(?P<path>.+)\[(?P<slice>[qkv]|\d+/\d+)\]")


def slice_path(path: str, i: int, n: int) -> str:
    """The name of output slice `i` of `n` of the fused projection at `path`: ``c_attn[q]`` (3 slices) or ``w[1/4]``."""
    return f"{path}[{'qkv'[i] if n == 3 else f'{i}/{n}'}]"


def split_slice(path: str) -> tuple[str, tuple[int, int] | None]:
    """(module path, (slice i, of n)) of a `slice_path` name; (path, None) for a whole module."""
    match = _SLICE.fullmatch(path)
    if match is None:
        return path, None
    part = match["slice"]
    return match["path"], ("qkv".index(part), 3) if part in "qkv" else tuple(map(int, part.split("/")))


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def weight_type(path: str) -> str:
    """The weight type of a module path, as the paper groups layers: its last name (``q_proj``)."""
    return path.rsplit(".", 1)[-1]


def layer_index(path: str) -> int | None:
    """The block number in a module path (``model.layers.7.self_attn.q_proj`` -> 7), None if there is none."""
    match = re.search(r"\.(\d+)\.", "." + path + ".")
    return int(match.group(1)) if match else None


def base_weight(model: nn.Module, mpath: str) -> Tensor:
    """The base weight W0 at `mpath` in the paper's orientation (d_out, d_in), matching `LayerUpdate.delta`.

    ``<path>[q]`` is a slice of a fused projection (see `adapter_updates`). On a merged lorakit model this is
    the exact W0 it keeps while merged, not W0 + ΔW; a PEFT `PeftModel` is read through its base layers (unmerged only).
    """
    module_path, part = split_slice(mpath)
    module = dict(_unwrap_peft(model).named_modules()).get(module_path)
    if _is_peft(module) and callable(getattr(module, "get_base_layer", None)):  # a PEFT LoRA layer around W0
        if getattr(module, "merged", False):
            raise ValueError(f"the PEFT model has an adapter merged into {module_path!r}, so its weight is W0 + ΔW, not W0: "
                             "call unmerge_adapter() on it first, or pass the base model itself")
        module = module.get_base_layer()
    if module is None or not isinstance(getattr(module, "weight", None), Tensor):
        raise ValueError(f"the base model has no weight at {module_path!r}: the adapter was trained on another model")
    W = module._buffers.get("lora_w0", module.weight).detach()
    W = W.T if (is_conv1d_gpt2(module) or isinstance(module, nn.Embedding)) else W.flatten(1)
    if part is not None:  # slice i of n equal output slices
        i, n = part
        d = W.shape[0] // n
        W = W[i * d : (i + 1) * d]
    return W


def _is_peft(obj: object) -> bool:
    """Whether `obj` is one of PEFT's classes (a PeftModel, a LoRA layer)."""
    return type(obj).__module__.split(".")[0] == "peft"


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The model inside a PEFT `PeftModel` (whose module paths start ``base_model.model.``), else `model` itself."""
    return model.get_base_model() if _is_peft(model) and callable(getattr(model, "get_base_model", None)) else model


# ---- reports --------------------------------------------------------------------------------------


@dataclass
class Analysis:
    """Everything `analyze` computes, by module path; `write_report` renders it."""

    adapters: list[AdapterInfo]
    spectra: dict[str, list[Tensor]]  # path -> singular values of ΔW, one per adapter
    similarity: dict[str, Tensor] = field(default_factory=dict)  # path -> φ (r1, r2) of the A's, two adapters
    delta_similarity: dict[str, Tensor] = field(default_factory=dict)  # path -> φ of ΔW's non-zero right-singular vectors (both ΔW ≠ 0)
    amplification: dict[str, list[Amplification | None]] = field(default_factory=dict)  # path -> one per adapter, None: ΔW = 0
    skipped: list[str] = field(default_factory=list)  # layers in only one of the two adapters
    notes: list[str] = field(default_factory=list)  # warnings for the report (two adapters naming different bases)


def check_comparable(a: AdapterInfo, b: AdapterInfo) -> list[str]:
    """The layers two adapters share; raises if they share none or a shared layer's shapes differ.

    The base models' names are not compared: one model goes by many (a local folder, a cache path, a hub id);
    see `base_names_differ`.
    """
    named = f" (the adapters name {a.base!r} and {b.base!r})" if base_names_differ(a, b) else ""
    common = [p for p in a.layers if p in b.layers]
    whole = {split_slice(p)[0] for p in a.layers} & {split_slice(p)[0] for p in b.layers}
    if not common and whole:
        raise ValueError(
            f"the adapters adapt the same fused layers in different ways ({sorted(whole)[0]!r}): one slice by slice "
            "(enable_lora, analysed as [q] / [v]), the other whole; compare adapters trained with the same enable_lora"
        )
    if not common:
        raise ValueError(
            f"the adapters share no adapted layer ({a.path}: {list(a.layers)[:4]}…, {b.path}: {list(b.layers)[:4]}…); "
            "train both on the same target_modules"
        )
    for p in common:
        ka, kb = a.layers[p].A.flatten(1).shape[1], b.layers[p].A.flatten(1).shape[1]
        if ka != kb:
            raise ValueError(f"layer {p} has input size {ka} in {a.path} but {kb} in {b.path}: not the same base model{named}")
        da, db = a.layers[p].shape[0], b.layers[p].shape[0]
        if da != db:
            raise ValueError(f"layer {p} has output size {da} in {a.path} but {db} in {b.path}: not the same base model{named}")
    return common


def base_names_differ(a: AdapterInfo, b: AdapterInfo) -> bool:
    """Whether both adapters name their base model and the names differ (a folder spelled two ways is one name)."""
    return bool(a.base and b.base and _same_place(a.base) != _same_place(b.base))


def _same_place(base: str) -> str:
    """A base-model name for comparison: a local folder by its real path (``./m``, ``m`` and ``/abs/m`` agree)."""
    return os.path.realpath(os.path.expanduser(base)) if os.path.exists(os.path.expanduser(base)) else base.rstrip("/")


def analyze(paths: list[str | os.PathLike], model: nn.Module | None = None) -> Analysis:
    """Spectra of ΔW for one or two adapters, φ between two, and amplification when the base `model` is given.

    `model` may be the base model, the base with these adapters injected (merged or not) or a PEFT `PeftModel`
    (unmerged). Every ΔW is analysed at its `numerical_rank` (below the adapter's r when B·A is rank-deficient).
    """
    if model is not None:
        check_module(model)
    if isinstance(paths, (str, os.PathLike)):
        raise ValueError(f"analyze takes a list of one or two adapter folders, e.g. [{str(paths)!r}]; got one path")
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"analyze takes one or two adapter folders, got {len(paths)}")
    infos = [adapter_updates(p) for p in paths]
    layers = check_comparable(*infos) if len(infos) == 2 else list(infos[0].layers)
    result = Analysis(infos, {})
    if len(infos) == 2 and base_names_differ(*infos):
        result.notes.append(f"the adapters name different base models ({infos[0].base!r} vs {infos[1].base!r}); "
                            "compared anyway: their layers' shapes agree")
        log.warning("%s", result.notes[-1])
    result.skipped = sorted({p for info in infos for p in info.layers} - set(layers), key=_natural_key)
    for p in layers:  # every decomposition of ΔW goes through its factors (r×r work), never the dense d×k matrix
        updates = [info.layers[p] for info in infos]
        result.spectra[p] = [u.svd[1].float() for u in updates]
        ranks = [u.delta_rank for u in updates]  # 0: ΔW = 0 (B = 0), no directions to compare or project on
        if len(updates) == 2 and all(bool(u.A.abs().max() > 0) for u in updates):  # A = 0 has no row space
            result.similarity[p] = subspace_similarity(updates[0].A, updates[1].A)
            if all(ranks):
                result.delta_similarity[p] = subspace_similarity(*(u.row_space for u in updates))
        if model is not None:
            W = base_weight(model, p)
            for info, u in zip(infos, updates):
                if tuple(W.shape) != u.shape:
                    raise ValueError(
                        f"{info.path}: layer {p} has ΔW {u.shape} but the base weight is "
                        f"{tuple(W.shape)}: the adapter was trained on another model"
                    )
            W64 = W.double()
            result.amplification[p] = [_amplification(W64, u.svd, r) if r else None for u, r in zip(updates, ranks)]
    return result


def _save_figure(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_similarity(phis: dict[str, Tensor], path: str | os.PathLike, title: str = "") -> None:
    """Heatmaps of φ(i, j) (rows i ≤ r1, columns j ≤ r2), one panel per layer, as in the paper's Figure 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(phis)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.8 + 2.4 * rows), squeeze=False, layout="constrained")
    for k, (ax, name) in enumerate(zip(axes.flat, names)):
        phi = phis[name].numpy()
        im = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest",
                       extent=(0.5, phi.shape[1] + 0.5, phi.shape[0] + 0.5, 0.5))
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        for axis, n in ((ax.xaxis, phi.shape[1]), (ax.yaxis, phi.shape[0])):  # i, j are ranks: integer ticks only
            if n <= 8:
                axis.set_ticks(range(1, n + 1))
            else:
                axis.set_major_locator(MaxNLocator(integer=True))
        if k % cols == 0:
            ax.set_ylabel("i")
        if k >= len(names) - cols:
            ax.set_xlabel("j")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="φ(i, j)")
    fig.suptitle(title)
    _save_figure(fig, Path(path))
    plt.close(fig)


def plot_spectra(spectra: dict[str, Tensor], path: str | os.PathLike, title: str = "") -> None:
    """Normalised singular values σ_i/σ_1 of ΔW, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in spectra.items():
        s = s[s > 0]
        if len(s):
            ax.plot(range(1, len(s) + 1), (s / s[0]).numpy(), marker=".", linewidth=1, label=name)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("i")
    ax.set_ylabel("σ_i / σ_1 of ΔW")
    ax.set_title(title)
    if len(spectra) <= 12 and ax.lines:
        ax.legend(fontsize=6)
    _save_figure(fig, Path(path))
    plt.close(fig)


def weight_groups(paths: list[str]) -> dict[str, list[str]]:
    """Paths grouped by weight type, labelled by the shortest name that tells the types apart.

    A type is the path after its block number (BERT's ``attention.output.dense``, ``output.dense`` and
    ``intermediate.dense`` are three types, not one "dense"); a path without a block number is its own type.
    """
    by_key: dict[tuple[str, str], list[str]] = {}  # (stack, type): an encoder-decoder's two stacks stay apart
    for p in paths:
        parts = re.split(r"\.\d+\.", p, maxsplit=1)
        by_key.setdefault((parts[0], parts[1]) if len(parts) == 2 else ("", p), []).append(p)
    types = list(dict.fromkeys(t for _, t in by_key))
    labels = {}
    for key in types:
        names = key.split(".")
        for k in range(1, len(names) + 1):
            label = ".".join(names[-k:])
            if not any(other != key and (other == label or other.endswith("." + label)) for other in types):
                break
        labels[key] = label
    stacks = {t: [s for s, t2 in by_key if t2 == t] for t in types}
    short = {t: {s: _stack_name(s, stacks[t]) for s in stacks[t]} for t in types}
    unique = {t: len(set(short[t].values())) == len(short[t]) for t in types}  # else stacks go by their full paths
    return {labels[t] if len(stacks[t]) == 1 else f"{labels[t]} ({short[t][s] if unique[t] else s})": ps
            for (s, t), ps in by_key.items()}


def _stack_name(stack: str, stacks: list[str]) -> str:
    """`stack` without the leading and trailing parts all `stacks` share (``model.encoder.layers`` → ``encoder``)."""
    names, others = stack.split("."), [s.split(".") for s in stacks]
    lead = 0
    while lead < len(names) - 1 and all(len(o) > lead and o[lead] == names[lead] for o in others):
        lead += 1
    trail = 0
    while trail < len(names) - lead - 1 and all(len(o) > trail and o[-1 - trail] == names[-1 - trail] for o in others):
        trail += 1
    return ".".join(names[lead:len(names) - trail])


def _file_label(label: str) -> str:
    """A weight-type label as a file-name part (``c_attn[q]`` -> ``c_attn_q``)."""
    return re.sub(r"[^\w.-]+", "_", label).strip("_")


def _short(path: str, label: str) -> str:
    idx = layer_index(path)
    return f"layer {idx} {label}" if idx is not None else path


def write_report(result: Analysis, out_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` with the tables and the PNG figures into `out_dir`; returns the report's path."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(a.path).name or a.path for a in result.adapters]
    if len(set(names)) < len(names):
        names = [f"adapter {i + 1}" for i in range(len(names))]
    lines = ["# LoRA adapter analysis", ""]
    for a in result.adapters:
        ranks = sorted({u.A.shape[0] for u in a.layers.values()})
        lines.append(f"- `{a.path}`: {len(a.layers)} adapted layers, r = {ranks}, base `{a.base}`")
    if result.skipped:
        lines.append(f"- layers in only one adapter (not compared): {', '.join(result.skipped)}")
    lines += [f"- warning: {note}" for note in result.notes]
    lines += ["", "## Singular spectrum of ΔW", "",
              "Effective rank = exp(entropy of σ/Σσ) (Roy & Vetterli 2007); σ₁/‖ΔW‖_F near 1: one direction dominates (its share of ‖ΔW‖²_F is the square). "
              "Rank = ΔW's numerical rank (`numerical_rank`).", ""]
    header = "| layer | " + " | ".join(f"‖ΔW‖_F ({n}) | rank ({n}) | eff. rank ({n}) | σ₁/‖ΔW‖_F ({n})" for n in names) + " |"
    lines += [header, "|" + "---|" * (1 + 4 * len(names))]
    deficient = []  # "layer (adapter)" where 0 < rank(ΔW) < r
    for p, spectra in result.spectra.items():
        cells = []
        for a, n, s in zip(result.adapters, names, spectra):
            norm, u = float(s.norm()), a.layers[p]
            k = u.delta_rank
            if 0 < k < u.rank:
                deficient.append(f"{p} ({n})")
            rank = f"{k} < r = {u.rank}" if 0 < k < u.rank else str(k)
            cells += [f"{norm:.3g}", rank, f"{effective_rank(s):.2f}", f"{float(s[0]) / norm:.2f}" if norm > 0 else "–"]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    if deficient:
        lines += ["", f"ΔW has lower rank than its adapter's r in {len(deficient)} layer(s): {', '.join(deficient)}. B·A is "
                  "rank-deficient there (e.g. columns of B still 0); the amplification's r, the ΔW φ columns and the "
                  "spectrum figures count only its directions with non-zero singular values."]
    for wt, paths in weight_groups(list(result.spectra)).items():
        for a, n in enumerate(names):
            rank_of = {p: result.adapters[a].layers[p].delta_rank for p in paths}
            have = [p for p in paths if rank_of[p]]  # ΔW = 0 (B = 0) has no spectrum to draw
            if have:
                fname = f"spectrum_{_file_label(wt)}_{a}.png"
                plot_spectra({_short(p, wt): result.spectra[p][a][: rank_of[p]] for p in have}, out / fname,
                             f"ΔW spectrum, {wt}, {n}")
                lines += ["", f"![spectrum {wt} {n}]({fname})"]
            if len(have) < len(paths):
                lines += ["", f"(spectrum not drawn for {n}, ΔW = 0 (untrained): {', '.join(p for p in paths if p not in have)})"]
    if len(result.adapters) == 2:
        lines += ["", f"## Subspace similarity φ({names[0]}, {names[1]}) (paper Sec. 7.2, Figures 3-4)", "",
                  "φ(i, j) = ‖U₁[:, :i]ᵀU₂[:, :j]‖²_F / min(i, j) over the right-singular vectors of A; "
                  "1 = same subspace, 0 = orthogonal. A random pair of i- and j-dim subspaces of ℝᵏ gives ≈ max(i, j)/k.", "",
                  "Columns marked ΔW use the top right-singular vectors of ΔW = B·A instead of A's (see `row_space`).", "",
                  "| layer | r₁ | r₂ | φ(1,1) | φ(1, r₂) | mean φ(i,j), i,j ≤ min(r₁,r₂) | ΔW: φ(1,1) | ΔW: mean φ | "
                  "random baseline φ(1,1) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in result.spectra:
            phi = result.similarity.get(p)
            if phi is None:
                lines.append(f"| {p} | – | – | A = 0 in an adapter (untrained: no subspace) | – | – | – | – | – |")
                continue
            m = min(phi.shape)
            dphi = result.delta_similarity.get(p)
            k = result.adapters[0].layers[p].A.flatten(1).shape[1]
            dm = min(dphi.shape) if dphi is not None else 0  # ΔW φ spans each ΔW's numerical rank, not r
            delta = f"{dphi[0, 0]:.3f} | {dphi[:dm, :dm].mean():.3f}" if dphi is not None else "ΔW = 0 | ΔW = 0"
            lines.append(f"| {p} | {phi.shape[0]} | {phi.shape[1]} | {phi[0, 0]:.3f} | {phi[0, -1]:.3f} | "
                         f"{phi[:m, :m].mean():.3f} | {delta} | {1 / k:.4f} |")
        for wt, paths in weight_groups(list(result.spectra)).items():
            for kind, phis in (("", result.similarity), ("delta_", result.delta_similarity)):
                have = [p for p in paths if p in phis]  # an untrained layer (A or ΔW = 0) has no directions
                if not have:
                    continue
                fname = f"similarity_{kind}{_file_label(wt)}.png"
                plot_similarity({_short(p, wt): phis[p] for p in have}, out / fname,
                                f"φ({names[0]}, {names[1]}, i, j), {wt}, {'ΔW' if kind else 'A'}")
                lines += ["", f"![similarity {kind}{wt}]({fname})"]
                if len(have) < len(paths):
                    lines.append(f"(not drawn, untrained in an adapter: {', '.join(p for p in paths if p not in have)})")
    if result.amplification:
        lines += ["", "## Amplification of W by ΔW (paper Sec. 7.3, Table 7)", "",
                  "‖UᵀWVᵀ‖_F with U, V the top-r singular vectors of ΔW, of W itself, or random; "
                  "factor = ‖ΔW‖_F / ‖UᵀWVᵀ‖_F with ΔW's directions.", "",
                  "| layer | adapter | r | ‖ΔW‖_F | ‖W‖_F | ‖UᵀWVᵀ‖ ΔW dirs | ‖UᵀWVᵀ‖ W dirs | ‖UᵀWVᵀ‖ random | factor |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p, amps in result.amplification.items():
            for n, a in zip(names, amps):
                if a is None:
                    lines.append(f"| {p} | {n} | – | 0 | – | – | – | – | ΔW = 0 (untrained adapter) |")
                    continue
                lines.append(f"| {p} | {n} | {a.r} | {a.delta_norm:.3g} | {a.weight_norm:.3g} | {a.proj_delta:.3g} | "
                             f"{a.proj_weight:.3g} | {a.proj_random:.3g} | {a.factor:.2f} |")
    report = out / "report.md"
    atomic_write_bytes(report, ("\n".join(lines) + "\n").encode())
    return report
