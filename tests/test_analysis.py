"""The paper's analyses against hand-computed cases, and `lorakit analyze` on saved adapters."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.analysis import (
    amplification,
    analyze,
    effective_rank,
    factored_svd,
    row_space,
    singular_spectrum,
    subspace_similarity,
)
from lorakit.cli import main


@pytest.mark.parametrize(("b_shape", "a_shape"), [((40, 3), (3, 30)), ((20, 6), (6, 50)), ((12, 4, 1, 1), (4, 3, 3, 3))])
def test_factored_svd_equals_the_dense_svd(b_shape, a_shape):
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(b_shape, generator=g), torch.randn(a_shape, generator=g)  # linear, and a conv's (B 1x1, A kernel)
    r = A.shape[0]
    U, S, Vh = factored_svd(B, A, 0.5)
    dense = 0.5 * B.flatten(1).double() @ A.flatten(1).double()
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, dense)
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:r])
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=torch.float64))
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(r, dtype=torch.float64))


def test_factored_svd_rejects_factors_of_different_rank():
    with pytest.raises(ValueError, match=r"B \(5, 3\) and A \(4, 7\) do not share a rank"):
        factored_svd(torch.randn(5, 3), torch.randn(4, 7))


def test_identical_subspaces_give_one():
    A = torch.randn(4, 20, generator=torch.Generator().manual_seed(0))
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))  # same row space, other basis
    phi = subspace_similarity(A, mix @ A)
    assert phi.shape == (4, 4)
    assert phi[-1, -1] == pytest.approx(1.0, abs=1e-6)  # the whole 4-dim spaces coincide
    assert torch.allclose(torch.diagonal(subspace_similarity(A, 3 * A)), torch.ones(4), atol=1e-6)


def test_orthogonal_subspaces_give_zero():
    eye = torch.eye(10)
    phi = subspace_similarity(eye[:3] * torch.tensor([[3.0], [2.0], [1.0]]), eye[3:8])
    assert phi.shape == (3, 5)
    assert phi.abs().max() < 1e-9


def test_nested_subspaces_hand_computed():
    """A1 spans e1, e2 (e1 strongest); A2 spans e2, e3 (e2 strongest): φ(1,1) = 0, φ(2,1) = 1, φ(2,2) = 1/2."""
    e = torch.eye(6)
    A1 = torch.stack([3 * e[0], e[1]])
    A2 = torch.stack([3 * e[1], e[2]])
    phi = subspace_similarity(A1, A2)
    assert torch.allclose(phi, torch.tensor([[0.0, 0.0], [1.0, 0.5]]), atol=1e-6)


def test_row_space_of_an_update_orders_its_directions():
    e = torch.eye(5)
    delta = 4 * torch.outer(e[0], e[2]) + torch.outer(e[1], e[3])  # directions e3 (σ=4), e4 (σ=1)
    rows = row_space(delta, 2)
    assert torch.allclose(rows.abs(), torch.stack([4 * e[2], e[3]]).double())
    phi = subspace_similarity(rows, torch.stack([2 * e[3], e[2]]))  # same plane, other order
    assert torch.allclose(phi, torch.tensor([[0.0, 1.0], [1.0, 1.0]]), atol=1e-6)


def test_subspace_similarity_rejects_different_inputs():
    with pytest.raises(ValueError, match="different input sizes"):
        subspace_similarity(torch.randn(2, 5), torch.randn(2, 6))


def test_amplification_constructed():
    """W = diag(10, 5, 1, 0.5); ΔW = 7·e3 e3ᵀ: ΔW's direction holds W's 1, W's top direction its 10."""
    W = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5]))
    delta = torch.zeros(4, 4)
    delta[2, 2] = 7.0
    amp = amplification(W, delta)
    assert amp.r == 1
    assert amp.delta_norm == pytest.approx(7.0)
    assert amp.weight_norm == pytest.approx(math.sqrt(100 + 25 + 1 + 0.25))
    assert amp.proj_delta == pytest.approx(1.0)
    assert amp.proj_weight == pytest.approx(10.0)
    assert amp.factor == pytest.approx(7.0)
    assert 0 <= amp.proj_random <= 10.0 + 1e-9
    assert amplification(W, delta, r=2).proj_weight == pytest.approx(math.sqrt(125))


def test_amplification_default_rank_is_the_rank_of_an_fp32_product():
    """ΔW = s·B·A computed in fp32: its round-off must not count as rank (it did: r=48, a factor of 4 instead of 45)."""
    g = torch.Generator().manual_seed(0)
    W, B, A = torch.randn(48, 64, generator=g), torch.randn(48, 4, generator=g), torch.randn(4, 64, generator=g)
    amp = amplification(W, 2 * B @ A)
    assert amp.r == 4 and amp.factor == pytest.approx(amplification(W, 2 * B @ A, r=4).factor)
    with pytest.raises(ValueError, match="ΔW is zero"):
        amplification(W, torch.zeros(48, 64))


def test_effective_rank_and_spectrum():
    assert effective_rank(torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.0]))) == pytest.approx(3.0)
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    B, A = torch.randn(8, 2), torch.randn(2, 6)
    s = singular_spectrum(B @ A)
    assert s.shape == (6,) and s[2:].abs().max() < 1e-5 * s[0]
    assert 1.0 <= effective_rank(s) <= 2.0 + 1e-6


def _trained_adapter(tmp_path, name: str, r: int, seed: int) -> str:
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    lorakit.adapters.randomize_adapters(model, std=0.1, seed=seed)
    return str(lorakit.save_adapter(model, tmp_path / name))


def test_analyze_from_files_matches_model(tmp_path):
    a8, a2 = _trained_adapter(tmp_path, "r8", 8, 0), _trained_adapter(tmp_path, "r2", 2, 1)
    model = tiny_llama()
    result = analyze([a8, a2], model)
    path = "model.layers.0.self_attn.q_proj"
    assert set(result.similarity) == {f"model.layers.{i}.self_attn.{t}_proj" for i in (0, 1) for t in "qv"}
    assert result.similarity[path].shape == (8, 2)
    loaded = lorakit.load_adapter(tiny_llama(), a8)
    layer = dict(loaded.named_modules())[path]
    expected = singular_spectrum(layer.delta_weight("default"))  # the dense ΔW: 32 values, only 8 non-zero
    assert torch.allclose(result.spectra[path][0], expected[:8], atol=1e-5) and expected[8:].abs().max() < 1e-5
    amp = result.amplification[path]
    assert [a.r for a in amp] == [8, 2]
    dense = amplification(layer.weight, layer.delta_weight("default"), r=8)  # from the factors == from the dense ΔW
    for field in ("delta_norm", "weight_norm", "proj_delta", "proj_weight", "proj_random"):
        assert getattr(amp[0], field) == pytest.approx(getattr(dense, field), rel=1e-6, abs=1e-9)
    assert amp[0].proj_weight >= amp[0].proj_delta - 1e-6  # W's own top directions capture the most of W


def test_cli_analyze_writes_report_and_figures(tmp_path):
    a8, a2 = _trained_adapter(tmp_path, "r8", 8, 0), _trained_adapter(tmp_path, "r2", 2, 1)
    out = tmp_path / "report"
    assert main(["analyze", a8, a2, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Subspace similarity" in report and "model.layers.1.self_attn.v_proj" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["similarity_delta_q_proj.png", "similarity_delta_v_proj.png", "similarity_q_proj.png",
                    "similarity_v_proj.png", "spectrum_q_proj_0.png",
                    "spectrum_q_proj_1.png", "spectrum_v_proj_0.png", "spectrum_v_proj_1.png"]
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_cli_analyze_with_a_model_folder_saved_without_tokenizer(tmp_path):
    """The amplification table needs the base weights only: a bare save_pretrained folder is enough."""
    a8 = _trained_adapter(tmp_path, "r8", 8, 0)
    tiny_llama().save_pretrained(tmp_path / "base")
    assert not list((tmp_path / "base").glob("tokenizer*"))
    assert main(["analyze", a8, "--model", str(tmp_path / "base"), "--out", str(tmp_path / "report")]) == 0
    assert "mplification" in (tmp_path / "report" / "report.md").read_text()
    weights = tmp_path / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: a one-line error, no report
    assert main(["analyze", a8, "--model", str(tmp_path / "base"), "--out", str(tmp_path / "r2")]) == 1
    assert not (tmp_path / "r2").exists()


def test_analyze_refuses_adapters_without_shared_layers(tmp_path, capsys):
    a = _trained_adapter(tmp_path, "qv", 2, 0)
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["k_proj"]))
    b = str(lorakit.save_adapter(model, tmp_path / "k"))
    out = tmp_path / "out"
    assert main(["analyze", a, b, "--out", str(out)]) == 1
    assert "share no adapted layer" in capsys.readouterr().err
    assert not out.exists()


def test_analyze_refuses_adapter_of_another_model(tmp_path):
    a = _trained_adapter(tmp_path, "a", 2, 0)
    bigger = transformers_llama_with_hidden(48)
    with pytest.raises(ValueError, match="another model"):
        analyze([a], bigger)


def transformers_llama_with_hidden(hidden: int) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


# ---- verifier round 2026-12-02 ---------------------------------------------------------------------

def _adapter(tmp_path, build, name: str, seed: int = 0, randomize: bool = True, **cfg) -> str:
    model = build()
    lorakit.inject(model, lorakit.LoraConfig(**{"r": 4, "alpha": 8, **cfg}))
    if randomize:
        lorakit.adapters.randomize_adapters(model, std=0.1, seed=seed)
    return str(lorakit.save_adapter(model, tmp_path / name))


def test_weight_types_sharing_a_last_name_get_their_own_figures(tmp_path):
    """BERT's attention.output.dense, intermediate.dense and output.dense are three weight types, not one "dense"."""
    from conftest import tiny_bert
    from lorakit.analysis import weight_groups

    a = _adapter(tmp_path, tiny_bert, "a", 0, target_modules="all-linear")
    b = _adapter(tmp_path, tiny_bert, "b", 1, target_modules="all-linear")
    result = analyze([a, b])
    groups = weight_groups(list(result.similarity))
    assert {"attention.output.dense", "intermediate.dense", "output.dense"} <= set(groups)
    assert sum(len(p) for p in groups.values()) == len(result.similarity)  # every layer in exactly one figure
    out = tmp_path / "report"
    assert main(["analyze", a, b, "--out", str(out)]) == 0
    for label in ("attention.output.dense", "intermediate.dense", "output.dense"):
        assert (out / f"similarity_{label}.png").is_file()


def test_amplification_on_a_merged_model_reads_w0(tmp_path):
    a = _adapter(tmp_path, tiny_llama, "a", target_modules=["q_proj", "v_proj"])
    plain = analyze([a], tiny_llama()).amplification
    merged_model = lorakit.load_adapter(tiny_llama(), a)
    lorakit.merge(merged_model)
    merged = analyze([a], merged_model).amplification
    for p in plain:
        assert merged[p][0].weight_norm == plain[p][0].weight_norm and merged[p][0].factor == plain[p][0].factor


def test_config_rank_that_disagrees_with_the_tensors_is_refused(tmp_path):
    import json

    a = _adapter(tmp_path, tiny_llama, "a", target_modules=["q_proj", "v_proj"])
    fields = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    fields["r"] = 8
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj has lora_A \[4, 32\].*config says rank 8"):
        analyze([a], tiny_llama())


def test_rank_above_a_layer_size_is_analysed_at_the_layer_rank(tmp_path):
    """GQA's v_proj is 32 -> 16 here: r = 64 gives at most 16 directions (the paper's r = 64 vs r = 8 setting)."""
    with pytest.warns(UserWarning, match="exceeds"):
        big = _adapter(tmp_path, tiny_llama, "big", 0, r=64, alpha=64, target_modules=["q_proj", "v_proj"])
    small = _adapter(tmp_path, tiny_llama, "small", 1, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    result = analyze([small, big], tiny_llama())
    v = "model.layers.0.self_attn.v_proj"
    assert result.similarity[v].shape == (8, 32) and result.delta_similarity[v].shape == (8, 16)
    assert result.amplification[v][1].r == 16
    assert main(["analyze", small, big, "--out", str(tmp_path / "out")]) == 0


def test_non_finite_adapter_is_refused_naming_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    a = _adapter(tmp_path, tiny_llama, "a", target_modules=["q_proj", "v_proj"])
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.self_attn.v_proj holds NaN or inf"):
        analyze([a])


def test_same_base_folder_spelled_two_ways_is_one_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    a = _adapter(tmp_path, tiny_llama, "a", 0, target_modules=["q_proj"], base_model_name_or_path="base")
    b = _adapter(tmp_path, tiny_llama, "b", 1, target_modules=["q_proj"], base_model_name_or_path=str(tmp_path / "base") + "/")
    assert analyze([a, b]).similarity


def test_untrained_adapter_gets_no_made_up_directions(tmp_path):
    zero = _adapter(tmp_path, tiny_llama, "zero", randomize=False, target_modules=["q_proj"])
    trained = _adapter(tmp_path, tiny_llama, "trained", target_modules=["q_proj"])
    result = analyze([zero, trained], tiny_llama())
    p = "model.layers.0.self_attn.q_proj"
    assert result.amplification[p][0] is None and result.amplification[p][1] is not None
    assert p not in result.delta_similarity
    out = tmp_path / "out"
    assert main(["analyze", zero, trained, "--out", str(out)]) == 0
    assert "ΔW = 0" in (out / "report.md").read_text()
    assert not (out / "similarity_delta_q_proj.png").exists()


def test_fused_qv_slices_are_analysed_as_wq_and_wv(tmp_path):
    """GPT-2's c_attn adapted on q and v: two entries, each the slice's own ΔW against its own rows of W."""
    from conftest import tiny_gpt2

    a = _adapter(tmp_path, tiny_gpt2, "a", target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]})
    result = analyze([a], tiny_gpt2())
    assert set(result.spectra) == {f"transformer.h.{i}.attn.c_attn[{s}]" for i in (0, 1) for s in "qv"}
    model = lorakit.load_adapter(tiny_gpt2(), a)
    layer = model.transformer.h[0].attn.c_attn
    dense = layer.delta_weight("default").T  # (3·32, 32) in the paper's orientation
    for s, rows in (("q", slice(0, 32)), ("v", slice(64, 96))):
        path = f"transformer.h.0.attn.c_attn[{s}]"
        torch.testing.assert_close(result.spectra[path][0], singular_spectrum(dense[rows])[:4], atol=1e-5, rtol=1e-5)
        W = layer.weight.T[rows]
        expected = amplification(W, dense[rows], r=4)
        assert result.amplification[path][0].weight_norm == pytest.approx(expected.weight_norm, rel=1e-6)
        assert result.amplification[path][0].factor == pytest.approx(expected.factor, rel=1e-5)


def test_cli_analyze_refuses_an_out_file_and_names_baseline_folders(tmp_path, capsys):
    a = _adapter(tmp_path, tiny_llama, "a", target_modules=["q_proj"])
    (tmp_path / "file.txt").write_text("x")
    assert main(["analyze", a, "--out", str(tmp_path / "file.txt")]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "bitfit").mkdir()
    (tmp_path / "bitfit" / "trainable.safetensors").write_bytes(b"")
    assert main(["analyze", str(tmp_path / "bitfit"), "--out", str(tmp_path / "o")]) == 1
    assert "baseline" in capsys.readouterr().err


def test_fused_and_whole_adapters_of_one_layer_get_a_message_that_says_so(tmp_path):
    from conftest import tiny_gpt2

    fused = _adapter(tmp_path, tiny_gpt2, "f", target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]})
    whole = _adapter(tmp_path, tiny_gpt2, "w", target_modules=["c_attn"])
    with pytest.raises(ValueError, match="same fused layers in different ways"):
        analyze([fused, whole])


def test_an_encoder_decoders_two_stacks_get_their_own_figures_and_panels(tmp_path):
    import transformers

    def bart():
        torch.manual_seed(0)
        cfg = transformers.BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
        return transformers.BartModel(cfg)

    a, b = (_adapter(tmp_path, bart, n, s, target_modules=["q_proj"]) for n, s in (("a", 0), ("b", 1)))
    result = analyze([a, b])
    from lorakit.analysis import weight_groups

    groups = weight_groups(list(result.similarity))
    assert set(groups) == {"self_attn.q_proj (encoder)", "self_attn.q_proj (decoder)", "encoder_attn.q_proj"}
    assert sorted(p for ps in groups.values() for p in ps) == sorted(result.similarity)
    out = tmp_path / "report"
    assert main(["analyze", a, b, "--out", str(out)]) == 0
    assert (out / "similarity_self_attn.q_proj_encoder.png").is_file() and (out / "similarity_self_attn.q_proj_decoder.png").is_file()


def test_untrained_factors_get_no_subspace_and_the_other_layers_are_still_drawn(tmp_path):
    a = _adapter(tmp_path, tiny_llama, "a", 0, target_modules=["q_proj"])
    model = lorakit.load_adapter(tiny_llama(), _adapter(tmp_path, tiny_llama, "b", 1, target_modules=["q_proj"]))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["default"].zero_()  # ΔW = 0 on layer 0
        model.model.layers[1].self_attn.q_proj.lora_A["default"].zero_()  # A = 0 on layer 1: no row space at all
    b = str(lorakit.save_adapter(model, tmp_path / "b0"))
    result = analyze([a, b])
    assert list(result.similarity) == ["model.layers.0.self_attn.q_proj"] and not result.delta_similarity
    out = tmp_path / "report"
    assert main(["analyze", a, b, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert (out / "similarity_q_proj.png").is_file() and "A = 0 in an adapter" in report
    assert "(not drawn, untrained in an adapter: model.layers.1.self_attn.q_proj)" in report


def test_analysis_inputs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="a list of one or two adapter folders"):
        analyze(str(tmp_path))
    with pytest.raises(ValueError, match=r"A1 must be a matrix"):
        subspace_similarity(torch.ones(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        amplification(torch.ones(3, 3), torch.full((3, 3), float("nan")))
    phi = subspace_similarity(torch.eye(3)[:2].numpy(), torch.eye(3)[:2])  # numpy arrays are fine
    assert phi[-1, -1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="A1 is all zeros: it spans no subspace"):
        subspace_similarity(torch.zeros(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="got a scalar"):
        effective_rank(torch.tensor(3.0))
    with pytest.raises(ValueError, match="delta must be a matrix"):
        singular_spectrum(torch.randn(5))
    with pytest.raises(ValueError, match="negative values"):
        effective_rank(torch.tensor([-1.0, 1.0]))


def test_adapters_whose_output_sizes_differ_are_not_the_same_base(tmp_path):
    def kv(heads: int):
        def build():
            torch.manual_seed(0)
            cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=heads)
            return transformers.LlamaForCausalLM(cfg)
        return build

    import transformers

    a = _adapter(tmp_path, kv(2), "a", target_modules=["v_proj"])
    b = _adapter(tmp_path, kv(4), "b", target_modules=["v_proj"])
    with pytest.raises(ValueError, match="output size 16 .* but 32 .*not the same base model"):
        analyze([a, b])


def test_analyze_out_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    a = _adapter(tmp_path, tiny_llama, "a", target_modules=["q_proj"])
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", a, "--out", "~/rep"]) == 0
    assert (tmp_path / "rep" / "report.md").is_file() and not (tmp_path / "~").exists()


def test_stacks_whose_short_names_would_collide_keep_their_full_paths():
    from lorakit.analysis import weight_groups

    paths = ["a.b.0.q", "a.b.1.q", "a.b.b.0.q", "a.b.b.1.q", "a.b.0.v"]
    groups = weight_groups(paths)
    assert sorted(p for ps in groups.values() for p in ps) == sorted(paths)
    assert groups["q (a.b)"] == ["a.b.0.q", "a.b.1.q"] and groups["q (a.b.b)"] == ["a.b.b.0.q", "a.b.b.1.q"]


# ---- review round 4 ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("d", "k", "dtype", "decay"), [(64, 64, torch.bfloat16, 0.3), (576, 576, torch.bfloat16, 1.0),
                                                        (2048, 256, torch.bfloat16, 0.05), (2048, 256, torch.float16, 0.05)])
def test_amplification_default_rank_of_a_low_precision_update(d, k, dtype, decay):
    """A rank-8 ΔW rounded to bf16/fp16: 8 directions (σ₈ down to σ₁/20), none of the rounding noise.

    The tolerance σ₁·max(d, k)·eps(dtype) was above σ₁ for bf16 at 576 ("ΔW is zero") and gave r = 7 at 64.
    """
    from lorakit.analysis import numerical_rank

    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(d, 8, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(k, 8, generator=g, dtype=torch.float64)).Q
    exact = (U * 0.01 * decay ** (torch.arange(8) / 7)) @ V.T
    delta = exact.to(dtype)
    W = (torch.randn(d, k, generator=g) / d**0.5).to(dtype)
    S = torch.linalg.svdvals(delta.double())
    assert numerical_rank(S, (d, k), dtype) == 8
    if d == k:  # the full amplification (two dense SVDs) where it is cheap
        amp = amplification(W, delta)
        assert amp.r == 8 and amp.factor == pytest.approx(amplification(W, delta, r=8).factor)
    assert numerical_rank(torch.linalg.svdvals(exact.float().double()), (d, k), torch.float32) == 8  # fp32 as before
    assert numerical_rank(torch.zeros(8, dtype=torch.float64), (d, k), dtype) == 0


def test_numerical_rank_is_public_and_refuses_a_matrix_for_its_singular_values():
    M = torch.randn(6, 4, dtype=torch.float64)
    assert lorakit.numerical_rank(torch.linalg.svdvals(M), tuple(M.shape)) == 4
    with pytest.raises(ValueError, match=r"1-D singular values .*svdvals.*shape \(6, 4\)"):
        lorakit.numerical_rank(M, tuple(M.shape))


def _rank_one_adapter(tmp_path, name: str = "rank1") -> str:
    """An r = 4 adapter whose B has one non-zero column: ΔW has rank 1 in every layer."""
    model = lorakit.load_adapter(tiny_llama(), _adapter(tmp_path, tiny_llama, f"{name}_src", target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p[:, 1:] = 0
    return str(lorakit.save_adapter(model, tmp_path / name))


def test_a_rank_deficient_update_is_analysed_at_its_rank_everywhere(tmp_path):
    """analyze() used r = 4 (three arbitrary null directions: factor 76 vs 485) where amplification() used 1."""
    from lorakit.analysis import adapter_updates, base_weight

    one, full = _rank_one_adapter(tmp_path), _adapter(tmp_path, tiny_llama, "full", 1, target_modules=["q_proj", "v_proj"])
    model = tiny_llama()
    result = analyze([one, full], model)
    p = "model.layers.0.self_attn.q_proj"
    u = adapter_updates(one).layers[p]
    assert u.rank == 4 and u.delta_rank == 1 and u.row_space.shape == (1, 32)
    direct = amplification(base_weight(model, p), u.delta)
    assert direct.r == 1 and result.amplification[p][0].r == 1 and result.amplification[p][1].r == 4
    assert result.amplification[p][0].factor == pytest.approx(direct.factor, rel=1e-6)
    assert result.delta_similarity[p].shape == (1, 4)  # only ΔW's non-zero direction, not 3 arbitrary ones
    out = tmp_path / "out"
    assert main(["analyze", one, full, "--model", _saved_base(tmp_path), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert f"| {p} | " in report and "1 < r = 4" in report
    assert "ΔW has lower rank than its adapter's r in 4 layer(s)" in report and f"{p} (rank1)" in report


def _saved_base(tmp_path) -> str:
    folder = tmp_path / "base"
    if not folder.exists():
        tiny_llama().save_pretrained(folder)
    return str(folder)


def test_adapters_naming_different_bases_are_compared_with_a_warning(tmp_path, caplog):
    """One model goes by many names (a cache path, a hub id): the shapes decide, the names only warn."""
    a = _adapter(tmp_path, tiny_llama, "a", 0, target_modules=["q_proj"], base_model_name_or_path="/cache/models/llama")
    b = _adapter(tmp_path, tiny_llama, "b", 1, target_modules=["q_proj"], base_model_name_or_path="someorg/tiny-llama")
    warning = ("the adapters name different base models ('/cache/models/llama' vs 'someorg/tiny-llama'); "
               "compared anyway: their layers' shapes agree")
    with caplog.at_level("WARNING", logger="lorakit.analysis"):
        result = analyze([a, b])
    assert result.similarity and result.notes == [warning] and warning in caplog.text
    caplog.clear()
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="lorakit.analysis"):
        assert main(["analyze", a, b, "--out", str(out)]) == 0
    assert warning in caplog.text and f"- warning: {warning}" in (out / "report.md").read_text()
    assert not analyze([a, _adapter(tmp_path, tiny_llama, "c", 2, target_modules=["q_proj"])]).notes  # one unnamed base


def test_adapters_naming_different_bases_whose_shapes_differ_are_refused(tmp_path):
    a = _adapter(tmp_path, tiny_llama, "a", target_modules=["q_proj"], base_model_name_or_path="org/small")
    wide = functools.partial(transformers_llama_with_hidden, 48)
    b = _adapter(tmp_path, wide, "b", target_modules=["q_proj"], base_model_name_or_path="org/wide")
    with pytest.raises(ValueError, match=r"input size 32 .* but 48 .*not the same base model \(the adapters name 'org/small' and 'org/wide'\)"):
        analyze([a, b])


def test_untrained_adapter_gets_no_empty_spectrum_figure(tmp_path):
    zero = _adapter(tmp_path, tiny_llama, "zero", randomize=False, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    assert main(["analyze", zero, "--model", _saved_base(tmp_path), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert not list(out.glob("*.png")) and "![spectrum" not in report
    assert ("(spectrum not drawn for zero, ΔW = 0 (untrained): model.layers.0.self_attn.q_proj, "
            "model.layers.1.self_attn.q_proj)") in report


def test_a_partly_trained_adapter_draws_its_trained_layers_only(tmp_path):
    model = lorakit.load_adapter(tiny_llama(), _adapter(tmp_path, tiny_llama, "src", target_modules=["q_proj"]))
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_B["default"].zero_()
    half = str(lorakit.save_adapter(model, tmp_path / "half"))
    out = tmp_path / "out"
    assert main(["analyze", half, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "![spectrum q_proj half](spectrum_q_proj_0.png)" in report
    assert "(spectrum not drawn for half, ΔW = 0 (untrained): model.layers.1.self_attn.q_proj)" in report


def test_a_peft_wrapped_base_model_is_unwrapped(tmp_path):
    """PeftModel's paths start base_model.model.: it was "no weight at 'model.layers.0…'"; merged, its W is W0 + ΔW."""
    peft = pytest.importorskip("peft")
    a = _adapter(tmp_path, tiny_llama, "a", target_modules=["q_proj", "v_proj"])
    plain = analyze([a], tiny_llama()).amplification
    pm = peft.PeftModel.from_pretrained(tiny_llama(), a)
    wrapped = analyze([a], pm).amplification
    for p in plain:
        assert wrapped[p][0] == plain[p][0]
    pm.merge_adapter()
    with pytest.raises(ValueError, match=r"PEFT model has an adapter merged into 'model.layers.0.self_attn.q_proj'.*unmerge_adapter\(\)"):
        analyze([a], pm)


def test_cli_reads_the_classification_task_from_the_adapter(tmp_path, capsys):
    """An encoder's adapter trained for classification: `--model` loads without `--task classification`."""
    import json

    from conftest import tiny_bert

    a = _adapter(tmp_path, tiny_bert, "a", target_modules=["query", "value"])
    tiny_bert().save_pretrained(tmp_path / "bert")
    out = tmp_path / "out"
    assert main(["analyze", a, "--model", str(tmp_path / "bert"), "--out", str(out)]) == 0
    assert "mplification" in (out / "report.md").read_text()
    config = tmp_path / "a" / "adapter_config.json"
    fields = json.loads(config.read_text())
    config.write_text(json.dumps({**fields, "auto_mapping": None, "modules_to_save": None}))  # a config that does not say
    assert main(["analyze", a, "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "o2")]) == 1
    assert "pass --task classification" in capsys.readouterr().err
    assert main(["analyze", a, "--model", str(tmp_path / "bert"), "--task", "classification", "--out", str(tmp_path / "o3")]) == 0
    config.write_text(json.dumps({**fields, "auto_mapping": None, "task_type": "SEQ_CLS"}))  # PEFT's way of saying it
    assert main(["analyze", a, "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "o4")]) == 0


@pytest.mark.parametrize("r", [0, 9, 2.5, "2", True])
def test_amplification_with_a_bad_rank_names_it(r):
    W, delta = torch.randn(8, 12), torch.randn(8, 2) @ torch.randn(2, 12)
    with pytest.raises(ValueError, match=r"r must be an integer in \[1, 8\] for a \(8, 12\) weight, got"):
        lorakit.amplification(W, delta, r=r)
