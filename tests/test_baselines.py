"""Baselines (full, BitFit, Houlsby/Lin adapters, prefix tuning, LoRA+prefix): each trains, and only what it should."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from conftest import BUILDERS, logits, tiny_bert, tiny_llama
from lorakit import baselines
from lorakit.baselines import prefix_attention


def _train_steps(model, ids, steps: int = 3) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(ids).logits
        loss = out.float().pow(2).mean() if out.dim() == 2 else torch.nn.functional.cross_entropy(
            out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["adapter-h", "adapter-l", "prefix", "lora+prefix", "bitfit", "full"])
def test_each_method_trains_only_its_parameters(arch, method, input_ids):
    model = BUILDERS[arch]()
    if method == "bitfit" and arch == "llama":
        with pytest.raises(ValueError, match="no bias parameters"):
            baselines.prepare(model, method)
        assert all(p.requires_grad for p in model.parameters())  # refused before changing anything
        return
    before = _snapshot(model)
    base_out = logits(model, input_ids)
    heads = ["classifier"] if arch == "bert" else None
    trainable = baselines.prepare(model, method, size=4, prefix_length=3, train_modules=heads)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    if method in ("adapter-h", "adapter-l", "bitfit", "full"):  # identity at init: same outputs
        torch.testing.assert_close(logits(model, input_ids), base_out)
    _train_steps(model, input_ids)
    after = {n.replace(".original_module.", "."): t for n, t in _snapshot(model).items()}  # LoRA's head: the base copy
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    new = set(after) - set(before)
    if method == "full":
        assert changed == set(before)
        return
    assert changed <= set(trainable), f"frozen base weights changed: {sorted(changed - set(trainable))[:5]}"
    if method == "bitfit":
        assert changed and all(n.endswith(".bias") or n.startswith("classifier.") for n in changed)
    else:
        assert not changed - {n for n in before if n.startswith("classifier.")}  # the base stays as it was
        assert new and new <= set(trainable)
        assert any(not torch.equal(p, 0 * p) for n, p in model.named_parameters() if n in new)


def test_houlsby_has_two_adapters_per_block_lin_one():
    h, lin = tiny_llama(), tiny_llama()
    ph, pl = baselines.adapter_h(h, bottleneck=4), baselines.adapter_l(lin, bottleneck=4)
    d, m = 32, 4
    per_adapter = 2 * d * m + d + m
    assert sum(p.numel() for p in ph.values()) == 2 * 2 * per_adapter  # 2 blocks × (attention + MLP)
    assert sum(p.numel() for p in pl.values()) == 2 * (per_adapter + 2 * d)  # 2 blocks × MLP, with a LayerNorm
    assert all(".o_proj." in n or ".down_proj." in n for n in ph)
    assert all(".down_proj." in n for n in pl)


def _reference_attention(q, k, v, pk, pv, scale, causal, groups):
    """softmax(q·[pk; k]ᵀ·scale + mask)·[pv; pv] written out, GQA by repetition."""
    b = q.shape[0]
    k = torch.cat([pk.expand(b, -1, -1, -1), k], 2).repeat_interleave(groups, 1)
    v = torch.cat([pv.expand(b, -1, -1, -1), v], 2).repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    t_q, n_p = q.shape[2], pk.shape[1]
    if causal:
        allowed = torch.ones(t_q, k.shape[2], dtype=torch.bool)
        allowed[:, n_p:] = torch.ones(t_q, t_q, dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, -math.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False])
def test_prefix_attention_matches_written_out_attention(causal):
    model = tiny_llama()
    baselines.add_prefix(model, length=3, std=1.0)
    attn = model.model.layers[0].self_attn
    attn.is_causal = causal
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    out, _ = prefix_attention(attn, q, k, v, None, scaling=attn.scaling)
    pre = attn.lorakit_prefix
    expected = _reference_attention(q, k, v, pre.key.detach(), pre.value.detach(), attn.scaling, causal, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_prefix_with_kv_cache_generates_as_without(input_ids):
    model = tiny_llama()
    baselines.prefix(model, length=4, std=1.0)
    prompt = input_ids[:1]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_prefix_respects_padding_mask():
    """A padded batch gives the real tokens the same outputs as the unpadded sequence (BERT: absolute positions)."""
    model = tiny_bert()
    baselines.prefix(model, length=2, std=1.0)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long()
    with torch.no_grad():
        a = model.bert(ids).last_hidden_state
        b = model.bert(padded, attention_mask=mask).last_hidden_state[:, :6]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lora_prefix_trains_both(input_ids):
    model = tiny_llama()
    trainable = baselines.prepare(model, "lora+prefix", lora_config=lorakit.LoraConfig(r=2), prefix_length=2)
    assert any(".lora_A." in n for n in trainable) and any(".lorakit_prefix." in n for n in trainable)
    assert lorakit.list_adapters(model) == ["default"]


def test_save_and_load_trainable_round_trip(tmp_path, input_ids):
    model = tiny_llama()
    baselines.adapter_h(model, bottleneck=4)
    _train_steps(model, input_ids, 2)
    baselines.save_trainable(model, tmp_path, "adapter-h")
    fresh = tiny_llama()
    baselines.adapter_h(fresh, bottleneck=4)
    baselines.load_trainable(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, input_ids), logits(model, input_ids))
    other = tiny_llama()
    baselines.adapter_h(other, bottleneck=8)
    before = _snapshot(other)
    with pytest.raises(ValueError, match="does not fit"):
        baselines.load_trainable(other, tmp_path)
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())


def test_bad_input_is_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="method must be one of"):
        baselines.prepare(model, "houlsby")
    with pytest.raises(ValueError, match="bottleneck"):
        baselines.adapter_h(model, bottleneck=0)
    with pytest.raises(ValueError, match="found no"):
        baselines.adapter_l(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    baselines.prefix(model, length=2)
    with pytest.raises(ValueError, match="only once"):
        baselines.prefix(model, length=2)


@pytest.mark.parametrize("method", ["adapter-h", "prefix", "lora+prefix", "bitfit"])
def test_trainer_method_hook(method, tmp_path):
    """`finetune(..., TrainConfig(method=...))` trains the baseline in bf16 autocast, saves its tensors, loads back."""
    from lorakit.training import TrainConfig, finetune
    from toy_tokenizer import ByteTokenizer

    model = tiny_bert(num_labels=2)
    before = _snapshot(model)
    data = [{"text": ("good fine " if i % 2 else "bad awful ") * 2, "label": i % 2} for i in range(16)]
    cfg = TrainConfig(task="classification", method=method, r=4, steps=3, lr=1e-2, batch_size=8, precision="bf16")
    result = finetune(model, ByteTokenizer(), data, data, cfg, out_dir=tmp_path)
    assert 0 < result.trainable < result.total and "eval_accuracy" in result.eval_metrics
    assert result.peak_memory_mb > 0 and result.median_step_s > 0  # what every method reports, in one format
    params = {n.replace(".modules_to_save.default.", "."): p  # LoRA trains its own copy of the head
              for n, p in model.named_parameters() if ".original_module." not in n}
    changed = {n for n, p in params.items() if n in before and not torch.equal(before[n].to(p.dtype), p)}
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert "classifier.weight" in changed and changed <= trainable
    fresh = tiny_bert(num_labels=2)
    baselines.prepare(fresh, method, lora_config=lorakit.LoraConfig(r=4, alpha=16, modules_to_save=["classifier"]),
                      size=4, train_modules=["classifier"])
    baselines.load_trainable(fresh, tmp_path)
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, dict(model.named_parameters())[n].float())


def test_a_method_the_model_cannot_take_leaves_no_output_folder(tmp_path):
    from lorakit.training import TrainConfig, finetune
    from toy_tokenizer import ByteTokenizer

    cfg = TrainConfig(method="bitfit", steps=1, precision="fp32")
    with pytest.raises(ValueError, match="bias"):
        finetune(tiny_llama(), ByteTokenizer(), [{"prompt": "a", "completion": "b"}], config=cfg, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_prefix_on_an_attention_without_a_readable_head_layout_is_a_clear_error():
    """GPT-NeoX's attention has neither head_dim nor attention_head_size: refused before any layer changes."""
    import transformers

    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.GPTNeoXForCausalLM(cfg)
    attn = model.gpt_neox.layers[0].attention
    if getattr(attn, "head_dim", None) or getattr(attn, "attention_head_size", None):
        pytest.skip("this transformers version gives GPT-NeoX a head_dim")
    with pytest.raises(ValueError, match="cannot read the head layout"):
        baselines.prefix(model)
    assert not any("prefix" in n for n, _ in model.named_parameters())
