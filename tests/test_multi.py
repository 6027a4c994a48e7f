"""Many tasks on one base model: named adapters, merged swapping, mixed-adapter batches, combining."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import lorakit
from conftest import BUILDERS, logits, tiny_llama
from lorakit.adapters import randomize_adapters
from lorakit.state import lora_layers

CFG_A = lorakit.LoraConfig(r=4, alpha=8)
CFG_B = lorakit.LoraConfig(r=8, alpha=16, use_rslora=True)


def two_adapters(arch: str = "llama", cfg_b: lorakit.LoraConfig = CFG_B, seed: int = 0):
    """A tiny model with adapters "a" (r=4) and "b" (r=8, rsLoRA), random non-zero A and B."""
    model = BUILDERS[arch]()
    lorakit.inject(model, CFG_A, adapter="a")
    lorakit.inject(model, cfg_b, adapter="b")
    randomize_adapters(model, std=0.1, seed=seed)
    return model


def per_adapter_reference(model, ids, rows):
    """Row i's logits with only rows[i] active (full batch each time, so padding is identical)."""
    out = torch.empty_like(logits(model, ids))
    for name in dict.fromkeys(rows):
        if name is None:
            with lorakit.disable_adapters(model):
                ref = logits(model, ids)
        else:
            lorakit.set_adapter(model, name)
            ref = logits(model, ids)
        for i, n in enumerate(rows):
            if n == name:
                out[i] = ref[i]
    return out


# ---- named adapters -------------------------------------------------------------------------------

def test_named_adapters_listed_switched_and_stacked(input_ids):
    model = two_adapters()
    assert lorakit.list_adapters(model) == ["a", "b"]
    lorakit.set_adapter(model, "a")
    out_a = logits(model, input_ids)
    lorakit.set_adapter(model, "b")
    out_b = logits(model, input_ids)
    assert not torch.allclose(out_a, out_b)
    lorakit.set_adapter(model, ["a", "b"])  # several active adapters add their updates
    both = logits(model, input_ids)
    lorakit.merge(model)
    assert torch.allclose(logits(model, input_ids), both, atol=1e-5)
    for _, layer in lora_layers(model):
        assert layer.merged_adapters == ["a", "b"]


def test_delete_adapter_frees_its_tensors(input_ids):
    model = two_adapters()
    lorakit.set_adapter(model, "b")
    out_b = logits(model, input_ids)
    refs = [weakref.ref(layer.lora_A["a"]) for _, layer in lora_layers(model)]
    lorakit.delete_adapter(model, "a")
    gc.collect()
    assert all(r() is None for r in refs)
    assert lorakit.list_adapters(model) == ["b"]
    assert torch.equal(logits(model, input_ids), out_b)
    with pytest.raises(ValueError, match="no adapter named"):
        lorakit.set_adapter(model, "a")


def test_training_one_adapter_leaves_the_others_frozen(input_ids):
    model = two_adapters()
    lorakit.set_adapter(model, "b")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    a_before = {k: v.detach().clone() for k, v in lorakit.adapter_state_dict(model, "a").items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lorakit.adapter_parameters(model, "b").values()}
    opt = torch.optim.SGD(trainable, lr=0.1)
    model(input_ids, labels=input_ids).loss.backward()
    opt.step()
    for _, layer in lora_layers(model):
        assert layer.lora_A["a"].grad is None and layer.lora_B["a"].grad is None
    assert all(torch.equal(v, a_before[k]) for k, v in lorakit.adapter_state_dict(model, "a").items())
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k[-2:] == ".b" for k in changed)  # only lora_A.b / lora_B.b moved


def test_save_and_load_named_adapters_round_trip(tmp_path, input_ids):
    model = two_adapters()
    lorakit.save_adapter(model, tmp_path / "a", adapter="a")
    lorakit.save_adapter(model, tmp_path / "b", adapter="b")
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "b", adapter="nli")
    lorakit.load_adapter(fresh, tmp_path / "a", adapter="sql")
    for src, dst in (("a", "sql"), ("b", "nli")):
        lorakit.set_adapter(model, src)
        lorakit.set_adapter(fresh, dst)
        assert torch.equal(logits(model, input_ids), logits(fresh, input_ids))
        saved, loaded = lorakit.adapter_state_dict(model, src), lorakit.adapter_state_dict(fresh, dst)
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


# ---- merged swapping ------------------------------------------------------------------------------

def test_merged_swap_equals_unmerged_and_restores_w0_exactly(input_ids):
    model = two_adapters()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.set_adapter(model, "b")
    ref_b = logits(model, input_ids)
    lorakit.set_adapter(model, "a")
    ref_a = logits(model, input_ids)
    lorakit.merge(model)
    assert torch.allclose(logits(model, input_ids), ref_a, atol=1e-5)
    lorakit.set_adapter(model, "b")  # unmerges a and merges b
    assert all(layer.merged_adapters == ["b"] for _, layer in lora_layers(model))
    assert torch.allclose(logits(model, input_ids), ref_b, atol=1e-5)
    lorakit.unmerge(model)
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())
    assert not any(name.endswith(("lora_w0", "lora_b0")) for name, _ in model.named_buffers())


@pytest.fixture
def one_thread():
    """Tiny GEMMs run far faster on one thread on the shared, busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_thousand_merged_swaps_do_not_drift(one_thread):
    model = two_adapters("gpt2")  # fused slices + Conv1D take the general (non-GEMM) merge path
    llama = two_adapters("llama")
    for m in (model, llama):
        w0 = {k: v.clone() for k, v in m.state_dict().items()}
        lorakit.set_adapter(m, "a")
        lorakit.merge(m)
        merged_a = {k: v.clone() for k, v in m.state_dict().items()}
        for i in range(1000):
            lorakit.set_adapter(m, "b" if i % 2 == 0 else "a")
        assert all(torch.equal(v, merged_a[k]) for k, v in m.state_dict().items())
        lorakit.unmerge(m)
        assert all(torch.equal(v, w0[k]) for k, v in m.state_dict().items())


def test_merge_and_unload_drops_the_w0_copy(input_ids):
    model = two_adapters()
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    merged = logits(model, input_ids)
    plain = lorakit.merge_and_unload(model)
    assert not any("lora" in name for name, _ in plain.named_buffers())
    assert torch.equal(logits(plain, input_ids), merged)


# ---- mixed batches --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_mixed_batch_rows_use_their_own_adapter(arch):
    model = two_adapters(arch)
    ids = torch.randint(3, 128, (5, 7), generator=torch.Generator().manual_seed(2))
    rows = ["a", "b", None, "a", "b"]
    ref = per_adapter_reference(model, ids, rows)
    lorakit.set_adapter(model, "a")
    with lorakit.mixed_batch(model, rows):
        mixed = logits(model, ids)
    assert torch.allclose(mixed, ref, atol=1e-5)
    assert torch.allclose(logits(model, ids), per_adapter_reference(model, ids, ["a"] * 5), atol=1e-6)


def test_mixed_batch_on_embedding_and_all_linear_layers():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]), adapter="emb")
    lorakit.inject(model, lorakit.LoraConfig(r=6, alpha=3, target_modules="all-linear"), adapter="lin")
    randomize_adapters(model, std=0.1)
    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(3))
    rows = ["lin", "emb", "emb", None]
    ref = per_adapter_reference(model, ids, rows)
    with lorakit.mixed_batch(model, rows):
        assert torch.allclose(logits(model, ids), ref, atol=1e-5)


def test_mixed_batch_rows_use_their_own_adapters_saved_head():
    model = BUILDERS["bert"]()
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, modules_to_save=["classifier"]), adapter=name)
    randomize_adapters(model, std=0.1)
    with torch.no_grad():
        for i, name in enumerate(("a", "b"), start=1):
            model.classifier.modules_to_save[name].weight.mul_(-i)  # each adapter's head is its own
    ids = torch.randint(3, 128, (5, 7), generator=torch.Generator().manual_seed(2))
    rows = ["b", None, "a", "b", None]
    ref = per_adapter_reference(model, ids, rows)
    with lorakit.mixed_batch(model, rows):
        assert torch.allclose(logits(model, ids), ref, atol=1e-5)
    assert model.classifier.rows is None


def test_mixed_generate_with_a_saved_lm_head():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, modules_to_save=["lm_head"]), adapter="a")
    lorakit.inject(model, CFG_A, adapter="b")
    randomize_adapters(model, std=0.1)
    with torch.no_grad():
        model.lm_head.modules_to_save["a"].weight.mul_(-1)
    ids = torch.randint(3, 128, (3, 4), generator=torch.Generator().manual_seed(5))
    rows = ["a", "b", None]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "num_return_sequences": 2, "pad_token_id": 0}
    expected = per_adapter_generate(model, ids, rows, kwargs)
    with torch.no_grad(), lorakit.mixed_batch(model, rows):
        assert torch.equal(model.generate(ids, **kwargs), expected)


def test_mixed_batch_runs_each_layer_once_per_forward_and_restores_merges():
    model = two_adapters()
    lorakit.set_adapter(model, "b")
    lorakit.merge(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    layer = lora_layers(model)[0][1]
    calls = []
    handle = layer.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    ids = torch.randint(3, 128, (4, 5), generator=torch.Generator().manual_seed(4))
    with lorakit.mixed_batch(model, ["a", "b", None, "a"]):
        assert all(not lay.merged_adapters for _, lay in lora_layers(model))  # base weights inside the block
        logits(model, ids)
    handle.remove()
    assert calls == [4]  # one forward for the whole batch, not one per adapter or per row
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    assert all(lay.merged_adapters == ["b"] and not lay.lora_disabled for _, lay in lora_layers(model))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0),
        dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0),
    ],
    ids=["greedy", "beams"],
)
def test_mixed_batch_through_generate_with_kv_cache(kwargs):
    model = two_adapters(seed=5)
    ids = torch.randint(3, 128, (4, 5), generator=torch.Generator().manual_seed(6))
    rows = ["b", None, "a", "b"]
    with lorakit.mixed_batch(model, rows), torch.no_grad():
        mixed = model.generate(ids, **kwargs)
    assert torch.equal(mixed, per_adapter_generate(model, ids, rows, kwargs))
    assert "generate" not in model.__dict__  # the block's generate wrapper is gone
    assert len({tuple(r) for r in mixed[:, 5:].tolist()}) > 1  # the adapters do change the text


def per_adapter_generate(model, ids, rows, kwargs):
    """Row i's `generate` output with only rows[i] active (num_return_sequences rows per input row)."""
    per_row = kwargs.get("num_return_sequences", 1)
    expected = None
    for name in dict.fromkeys(rows):
        with torch.no_grad():
            if name is None:
                with lorakit.disable_adapters(model):
                    out = model.generate(ids, **kwargs)
            else:
                lorakit.set_adapter(model, name)
                out = model.generate(ids, **kwargs)
        expected = torch.empty_like(out) if expected is None else expected
        for i, n in enumerate(rows):
            if n == name:
                expected[i * per_row:(i + 1) * per_row] = out[i * per_row:(i + 1) * per_row]
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows", [2, 8])  # 3 stack slots: 2 rows' (fp32) factors are kept, 8 rows' exceed twice the stacks
def test_mixed_generate_reuses_per_row_factors_only_within_budget(dtype, n_rows):
    model = two_adapters(seed=11).to(dtype)
    ids = torch.randint(3, 128, (n_rows, 4), generator=torch.Generator().manual_seed(12))
    rows = (["a", "b", None, "b"] * 2)[:n_rows]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    seen = []
    with lorakit.mixed_batch(model, rows), torch.no_grad():
        mixed = model.generate(ids, **kwargs)
        for _, layer in lora_layers(model):
            seen += [hook.kept_rows for hook in layer._forward_hooks.values() if hasattr(hook, "kept_rows")]
    assert torch.equal(mixed, per_adapter_generate(model, ids, rows, kwargs))
    assert seen and all((kept is not None) == (n_rows == 2) for kept in seen)
    assert not any(hasattr(h, "kept_rows") for _, layer in lora_layers(model) for h in layer._forward_hooks.values())


def test_mixed_batch_sees_adapters_changed_added_or_removed_since_the_last_batch():
    model = two_adapters()
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(7))
    rows = ["a", "b", None]
    with lorakit.mixed_batch(model, rows):
        logits(model, ids)  # builds the per-layer stacks
    randomize_adapters(model, std=0.1, seed=9)  # in-place change of every A and B
    ref = per_adapter_reference(model, ids, rows)
    with lorakit.mixed_batch(model, rows):
        assert torch.allclose(logits(model, ids), ref, atol=1e-5)
    for _, layer in lora_layers(model):  # storage swapped under the same Parameter (no version bump)
        layer.lora_B["b"].data = torch.randn_like(layer.lora_B["b"]) * 0.1
    ref = per_adapter_reference(model, ids, rows)
    with lorakit.mixed_batch(model, rows):
        assert torch.allclose(logits(model, ids), ref, atol=1e-5)
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=5), adapter="c")
    randomize_adapters(model, std=0.1, seed=10)
    lorakit.delete_adapter(model, "a")
    rows = ["c", "b", None]
    ref = per_adapter_reference(model, ids, rows)
    with lorakit.mixed_batch(model, rows):
        assert torch.allclose(logits(model, ids), ref, atol=1e-5)
    plain = lorakit.unload(model)
    assert not any("_lora_mixed_cache" in m.__dict__ for m in plain.modules())


def test_an_adapter_changed_while_no_batch_used_it_is_seen_when_a_batch_does():
    model = two_adapters()
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(8))
    with lorakit.mixed_batch(model, ["a", "b"]):
        logits(model, ids)  # both slots filled
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["b"].mul_(-2.0)  # "b" changes in place ...
    ref = per_adapter_reference(model, ids, ["a", None])
    with lorakit.mixed_batch(model, ["a", None]):  # ... while a batch without it runs
        assert torch.allclose(logits(model, ids), ref, atol=1e-5)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A["a"].add_(0.05)  # and "a" changes after that batch used it
    rows = ["b", "a"]
    ref = per_adapter_reference(model, ids, rows)
    with lorakit.mixed_batch(model, rows):
        assert torch.allclose(logits(model, ids), ref, atol=1e-5)


def test_mixed_batch_rejects_bad_input_and_leaves_model_unchanged(input_ids):
    model = two_adapters()
    lorakit.set_adapter(model, "a")
    before = logits(model, input_ids)
    with pytest.raises(ValueError, match="no adapter named \\['zzz'\\]"), lorakit.mixed_batch(model, ["a", "zzz"]):
        pass
    with pytest.raises(ValueError, match="one name per row"), lorakit.mixed_batch(model, ["a", "b", "a"]):
        logits(model, input_ids)  # 2 rows, 3 names
    with pytest.raises(ValueError, match="only model.generate may repeat rows"), lorakit.mixed_batch(model, ["a"]):
        logits(model, input_ids)  # 2 rows, 1 name: outside generate a multiple is a mistake, not beams
    with pytest.raises(ValueError, match="empty"), lorakit.mixed_batch(model, []):
        pass
    assert torch.equal(logits(model, input_ids), before)
    assert all(not layer._forward_hooks for _, layer in lora_layers(model))


# ---- combining ------------------------------------------------------------------------------------

def explicit_sum(model, weights):
    """Σ w_i·ΔW_i per layer path, from each layer's own delta_weight (which applies rsLoRA)."""
    out = {}
    for path, layer in lora_layers(model):
        for n, w in weights.items():
            if n in layer.lora_specs:
                out[path] = out.get(path, 0) + w * layer.delta_weight(n)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_combine_cat_is_exact_with_rslora_and_different_ranks(arch, input_ids, tmp_path):
    model = two_adapters(arch)
    weights = {"a": 0.7, "b": -0.3}
    lorakit.combine_adapters(model, weights, name="ab", method="cat")
    assert lorakit.active_adapters(model) == ["b"]  # combining does not change what is active
    want = explicit_sum(model, weights)
    for path, layer in lora_layers(model):
        assert layer.lora_specs["ab"].r == sum(layer.lora_A[n].shape[0] for n in weights)
        assert torch.allclose(layer.delta_weight("ab"), want[path], atol=1e-6)
    lorakit.set_adapter(model, "ab")
    out = logits(model, input_ids)
    lorakit.save_adapter(model, tmp_path, adapter="ab")
    fresh = BUILDERS[arch]()
    lorakit.load_adapter(fresh, tmp_path, adapter="ab")
    assert torch.equal(logits(fresh, input_ids), out)


def test_combine_linear_follows_its_formula_and_needs_equal_ranks():
    model = two_adapters(cfg_b=lorakit.LoraConfig(r=4, alpha=32, use_rslora=True))
    lorakit.combine_adapters(model, {"a": 0.25, "b": -0.64}, name="lin", method="linear")
    for _, layer in lora_layers(model):  # PEFT's formula: c = w·s, A = Σ sign(c)√|c|·A, B = Σ √|c|·B
        ca, cb = 0.25 * layer.lora_specs["a"].scale, -0.64 * layer.lora_specs["b"].scale
        A = ca**0.5 * layer.lora_A["a"] - (-cb) ** 0.5 * layer.lora_A["b"]
        B = ca**0.5 * layer.lora_B["a"] + (-cb) ** 0.5 * layer.lora_B["b"]
        assert torch.allclose(layer.delta_weight("lin"), B @ A, atol=1e-6)
    lorakit.combine_adapters(model, {"a": 1.0}, name="same", method="linear")
    for _, layer in lora_layers(model):
        assert torch.allclose(layer.delta_weight("same"), layer.delta_weight("a"), atol=1e-6)
    uneven = two_adapters()
    with pytest.raises(ValueError, match="equal ranks"):
        lorakit.combine_adapters(uneven, {"a": 0.5, "b": 0.5}, name="x", method="linear")
    assert lorakit.list_adapters(uneven) == ["a", "b"]


def test_combine_linear_on_fused_layers_names_the_ranks_and_the_slices():
    from conftest import tiny_gpt2

    model = tiny_gpt2()
    for name, (r, slices) in {"a": (2, [True, False, True]), "b": (2, [True, True, True]), "c": (4, [True, False, True])}.items():
        lorakit.inject(model, lorakit.LoraConfig(r=r, target_modules=["c_attn"], enable_lora={"c_attn": slices}), adapter=name)
    with pytest.raises(ValueError, match=r"equal ranks, got \{'a': 2, 'c': 4\}"):
        lorakit.combine_adapters(model, {"a": 0.5, "c": 0.5}, name="x", method="linear")
    with pytest.raises(ValueError, match="same fused slices"):
        lorakit.combine_adapters(model, {"a": 0.5, "b": 0.5}, name="x", method="linear")
    assert lorakit.list_adapters(model) == ["a", "b", "c"]


def test_combine_svd_refits_to_the_target_rank():
    model = two_adapters("gpt2")
    weights = {"a": 0.5, "b": 0.5}
    want = explicit_sum(model, weights)
    lorakit.combine_adapters(model, weights, name="full", method="svd", rank=24)  # fused q,v slices: 2·4 + 2·8, exact
    lorakit.combine_adapters(model, weights, name="r3", method="svd", rank=3)
    for path, layer in lora_layers(model):
        assert torch.allclose(layer.delta_weight("full"), want[path], atol=1e-5)
        assert layer.lora_specs["r3"].r == 3
        best = torch.linalg.svdvals(want[path])
        err = torch.linalg.matrix_norm(layer.delta_weight("r3") - want[path])
        assert torch.isclose(err, best[3:].norm(), rtol=1e-4, atol=1e-6)  # Eckart–Young optimum


def test_combine_svd_with_a_rank_beyond_the_sum_of_the_sources_gives_that_sum_and_says_so():
    model = two_adapters("gpt2")
    weights = {"a": 0.5, "b": 0.5}
    want = explicit_sum(model, weights)
    with pytest.warns(UserWarning, match="rank=1000 is more than the combined update has"):
        lorakit.combine_adapters(model, weights, name="big", method="svd", rank=1000)
    for path, layer in lora_layers(model):
        assert layer.lora_specs["big"].r == layer.lora_A["a"].shape[0] + layer.lora_A["b"].shape[0]
        assert torch.allclose(layer.delta_weight("big"), want[path], atol=1e-5)


def test_combine_rejects_bad_input():
    model = two_adapters()
    for kwargs, msg in (
        (dict(weights={"zz": 1.0}, name="n"), "no adapter named"),
        (dict(weights={"a": 1.0}, name="b"), "already exists"),
        (dict(weights={"a": 1.0}, name="n", method="ties"), "method must be one of"),
        (dict(weights={"a": 1.0}, name="n", method="svd", rank=0), "positive integer"),
    ):
        with pytest.raises(ValueError, match=msg):
            lorakit.combine_adapters(model, **kwargs)
    assert lorakit.list_adapters(model) == ["a", "b"]
    assert all(set(layer.lora_specs) == {"a", "b"} for _, layer in lora_layers(model))


@pytest.mark.slow
def test_mixed_batch_on_smollm2_matches_one_adapter_at_a_time():
    from lorakit.models import bundled_path, load_model

    try:
        bundled_path("smollm2-135m")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))
    model, _ = load_model("smollm2-135m")
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), adapter="qv")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, use_rslora=True, target_modules="all-linear"), adapter="all")
    randomize_adapters(model, std=0.02)
    ids = torch.randint(10, 40000, (3, 12), generator=torch.Generator().manual_seed(0))
    rows = ["qv", None, "all"]
    ref = per_adapter_reference(model, ids, rows)
    with lorakit.mixed_batch(model, rows):
        assert torch.allclose(logits(model, ids), ref, atol=1e-3)


def test_a_name_listed_twice_in_set_adapter_applies_once(input_ids):
    model = two_adapters()
    lorakit.set_adapter(model, "a")
    once = logits(model, input_ids)
    lorakit.set_adapter(model, ["a", "a"])
    assert lorakit.active_adapters(model) == ["a"]
    assert torch.equal(logits(model, input_ids), once)


@pytest.mark.parametrize("tokens", [3, 20])  # 4 rows: ≤ / > SMALL_BATCH_ROWS, fp32 / bf16 rank-r products
def test_bf16_mixed_batch_equals_one_adapter_at_a_time_bit_for_bit(tokens):
    model = two_adapters(seed=7).to(torch.bfloat16)
    ids = torch.randint(3, 128, (4, tokens), generator=torch.Generator().manual_seed(8))
    rows = ["b", None, "a", "b"]
    with torch.no_grad():
        ref = per_adapter_reference(model, ids, rows)
    with lorakit.mixed_batch(model, rows):
        with torch.no_grad():
            assert torch.equal(logits(model, ids), ref)
        model.get_input_embeddings().weight.requires_grad_(True)  # an output that records a graph: not written in place
        recorded = model(ids).logits
        model.get_input_embeddings().weight.requires_grad_(False)
    assert recorded.grad_fn is not None and recorded.dtype == torch.bfloat16
    assert torch.equal(recorded.detach(), ref)


def test_the_model_cannot_change_inside_a_mixed_batch(input_ids):
    model = two_adapters()
    out = logits(model, input_ids)
    with lorakit.mixed_batch(model, ["a", "b"]):
        for action, match in [(lambda: lorakit.mixed_batch(model, ["b", "a"]).__enter__(), "open another mixed_batch"),
                              (lambda: lorakit.delete_adapter(model, "a"), "delete adapter 'a'"),
                              (lambda: lorakit.set_adapter(model, "a"), "change the active adapters"),
                              (lambda: lorakit.merge(model), "merge"),
                              (lambda: lorakit.inject(model, CFG_A, adapter="c"), "add adapter 'c'"),
                              (lambda: lorakit.disable_adapters(model).__enter__(), "disable adapters")]:
            with pytest.raises(ValueError, match=f"cannot {match} inside a mixed_batch block"):
                action()
    assert lorakit.list_adapters(model) == ["a", "b"]
    torch.testing.assert_close(logits(model, input_ids), out)


def test_nested_disable_adapters_restores_the_outer_block(input_ids):
    model = two_adapters()
    lorakit.set_adapter(model, "b")
    with lorakit.disable_adapters(model):
        base = logits(model, input_ids)
        with lorakit.disable_adapters(model):
            pass
        torch.testing.assert_close(logits(model, input_ids), base, rtol=0, atol=0)  # still the base model
    assert not torch.allclose(logits(model, input_ids), base)


def test_generate_with_another_batch_size_than_the_names_is_refused():
    model = two_adapters()
    ids = torch.randint(3, 128, (4, 5), generator=torch.Generator().manual_seed(1))
    with lorakit.mixed_batch(model, ["a", "b"]), pytest.raises(ValueError, match="2 adapter names but generate got 4 input rows"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert "generate" not in model.__dict__


@pytest.mark.parametrize("active", [[], ["b"]])
def test_combine_keeps_the_active_set_even_when_empty(active, input_ids):
    model = two_adapters()
    lorakit.inject(model, CFG_A, adapter="c")  # active; deleting it leaves no adapter active
    lorakit.set_adapter(model, active or "c")
    if not active:
        lorakit.delete_adapter(model, "c")
    before = logits(model, input_ids)
    lorakit.combine_adapters(model, {"a": 0.5, "b": 0.5}, name="ab")
    assert lorakit.active_adapters(model) == active and "ab" in lorakit.list_adapters(model)
    torch.testing.assert_close(logits(model, input_ids), before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["half", "keys", "update", "train"])
def test_a_name_that_is_a_module_dict_attribute_is_refused_before_any_change(name, input_ids, tmp_path):
    model = two_adapters()
    out = logits(model, input_ids)
    folder = lorakit.save_adapter(model, tmp_path / "a", adapter="a")
    for action in (lambda: lorakit.inject(model, CFG_A, adapter=name), lambda: lorakit.load_adapter(model, folder, adapter=name),
                   lambda: lorakit.combine_adapters(model, {"a": 1.0}, name=name)):
        with pytest.raises(ValueError, match=f"adapter name '{name}' is reserved"):
            action()
    assert lorakit.list_adapters(model) == ["a", "b"]
    torch.testing.assert_close(logits(model, input_ids), out, rtol=0, atol=0)


def test_mixed_batch_and_combine_reject_malformed_arguments():
    model = two_adapters()
    with pytest.raises(ValueError, match="one adapter name .* per row.*got the string 'a'"):
        lorakit.mixed_batch(model, "a").__enter__()
    with pytest.raises(ValueError, match="weights must be finite numbers"):
        lorakit.combine_adapters(model, {"a": float("nan"), "b": 0.5}, name="ab")
    assert lorakit.list_adapters(model) == ["a", "b"]


def test_a_saved_module_whose_input_is_not_per_row_cannot_be_mixed():
    model = BUILDERS["gpt2"]()
    lorakit.inject(model, lorakit.LoraConfig(r=2, modules_to_save=["wpe"]), adapter="a")
    lorakit.inject(model, CFG_A, adapter="b")
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    with lorakit.mixed_batch(model, ["b", None, "b"]):  # no row uses a's copy of wpe: fine
        logits(model, ids)
    with pytest.raises(ValueError, match=r"got an input of batch size 1 for 3 rows"), lorakit.mixed_batch(model, ["a", "b", None]):
        logits(model, ids)


# ---- verifier round 2026-12-02 ---------------------------------------------------------------------

def test_mixed_batch_in_training_mode_with_grad_is_refused():
    """Its per-row copies carry no gradient to A, B: training through it would silently update only the heads."""
    model = two_adapters()
    model.train()
    ids = torch.randint(0, 128, (2, 6))
    with pytest.raises(RuntimeError, match="mixed_batch is for inference"), lorakit.mixed_batch(model, ["a", "b"]):
        model(ids)
    model.eval()
    with lorakit.mixed_batch(model, ["a", "b"]):
        model(ids)  # eval mode: fine, also with grad enabled


def test_mixed_batch_stacks_follow_a_change_of_the_base_dtype():
    model = two_adapters()
    ids = torch.randint(0, 128, (2, 6))
    lorakit.cast_base(model, torch.bfloat16)
    with torch.no_grad(), lorakit.mixed_batch(model, ["a", "b"]):
        model(ids)  # stacks built in bf16
    model.float()
    with torch.no_grad(), lorakit.mixed_batch(model, ["a", "b"]):
        mixed = model(ids).logits
    torch.testing.assert_close(mixed, per_adapter_reference(model, ids, ["a", "b"]), atol=1e-5, rtol=1e-5)


def test_combine_cat_or_linear_with_a_rank_is_refused():
    model = two_adapters()
    for method in ("cat", "linear"):
        with pytest.raises(ValueError, match="rank applies to method='svd' only"):
            lorakit.combine_adapters(model, {"a": 0.5, "b": 0.5}, name="ab", method=method, rank=2)
    assert lorakit.list_adapters(model) == ["a", "b"]


def test_a_scaled_word_embeddings_update_is_scaled_like_its_lookup_unmerged_merged_and_per_row():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)
    model = transformers.GemmaForCausalLM(cfg).eval()  # its embedding multiplies the lookup by √64 = 8
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens"]), adapter="a")
    randomize_adapters(model, std=0.1, seed=0)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    unmerged = logits(model, ids)
    with lorakit.mixed_batch(model, ["a", "a"]):
        mixed = logits(model, ids)
    lorakit.merge(model)
    torch.testing.assert_close(unmerged, logits(model, ids), rtol=0, atol=1e-4)
    torch.testing.assert_close(mixed, unmerged, rtol=0, atol=1e-4)


def test_a_conv_adapter_no_row_uses_does_not_block_a_mixed_batch():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv = torch.nn.Linear(4, 4), torch.nn.Conv1d(4, 4, 1)

        def forward(self, x):
            return self.lin(x) + self.conv(x.transpose(1, 2)).transpose(1, 2)

    model = Net()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["lin"]), adapter="lin")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["conv"]), adapter="cv")
    randomize_adapters(model, std=0.3, seed=0)
    x = torch.randn(2, 3, 4)
    lorakit.set_adapter(model, "lin")
    with torch.no_grad():
        ref = model(x)
        with lorakit.mixed_batch(model, ["lin", "lin"]):
            torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="supports linear and embedding LoRA layers, not Conv1d"), \
                lorakit.mixed_batch(model, ["cv", None]):
            pass


def test_a_layer_that_sees_flattened_tokens_is_named_in_the_mixed_batch_error():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.expert = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.expert(x.reshape(-1, x.shape[-1]))  # (b·T, d): rows of the batch no longer apart

    model = lorakit.inject(Net(), lorakit.LoraConfig(r=2, target_modules=["expert"]), adapter="a")
    rows = pytest.raises(ValueError, match=r"layer 'expert' got a batch of 6 rows.*mixture-of-experts.*exclude_modules")
    with lorakit.mixed_batch(model, ["a", None]), torch.no_grad(), rows:
        model(torch.randn(2, 3, 4))


def test_a_whole_block_saved_by_a_row_adapter_is_a_clear_error_in_a_mixed_batch(input_ids):
    """A saved block takes the batch's masks and cache beside its input: its copies cannot run on a row subset."""
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], layers=[0], modules_to_save=["layers.1"]), adapter="blk")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["o_proj"]), adapter="o")
    with pytest.raises(ValueError, match=r"\['blk'\].*set_adapter"), lorakit.mixed_batch(model, ["blk", "o"]):
        model(input_ids, attention_mask=torch.ones_like(input_ids))
    with lorakit.mixed_batch(model, ["o", None]):  # rows that do not use the block's copies run
        model(input_ids)


def test_merge_and_unload_leaves_no_lorakit_hook_on_a_saved_heads_copy():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    plain = lorakit.merge_and_unload(model)
    assert type(plain.lm_head) is torch.nn.Linear
    assert not [m for m in plain.modules() if m._forward_pre_hooks]
