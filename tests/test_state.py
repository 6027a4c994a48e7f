"""Model-level state: requires_grad flags restored and the output-head hook removed with the last adapter."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import tiny_bert, tiny_llama
from lorakit.state import get_state

CFG = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


def head_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[bool]:
    """Whether each input the output head got during a batched generate was contiguous."""
    seen: list[bool] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    try:
        with torch.no_grad():
            model.generate(ids, **GEN)
    finally:
        handle.remove()
    return seen


def test_generate_gives_the_frozen_head_a_contiguous_input(input_ids):
    """generate slices the last position (not contiguous at batch > 1): a frozen head would expand its weight per row."""
    plain = tiny_llama()
    assert not all(head_inputs(plain, input_ids)), "the plain model's head no longer gets a sliced input: test is moot"
    model = lorakit.inject(tiny_llama(), CFG)
    assert not model.lm_head.weight.requires_grad
    assert all(head_inputs(model, input_ids))
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids, **GEN), plain.generate(input_ids, **GEN))  # B = 0: the base's tokens


@pytest.mark.parametrize("how", ["unload", "merge_and_unload", "delete_adapter"])
def test_last_adapter_gone_restores_flags_and_removes_the_hook(how):
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a flag the user set before injecting
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    lorakit.inject(model, CFG)
    assert len(model.lm_head._forward_pre_hooks) == 1
    if how == "delete_adapter":
        lorakit.delete_adapter(model, "default")
    else:
        model = getattr(lorakit, how)(model)
    assert get_state(model, required=False) is None
    assert len(model.lm_head._forward_pre_hooks) == 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_failed_inject_leaves_no_hook():
    model = tiny_llama()
    with pytest.raises(ValueError):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["no_such_module"]))
    assert get_state(model, required=False) is None
    assert len(model.lm_head._forward_pre_hooks) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_deepcopy_has_its_own_hook(input_ids):
    model = lorakit.inject(tiny_llama(), CFG)
    twin = lorakit.unload(copy.deepcopy(model))
    assert len(twin.lm_head._forward_pre_hooks) == 0
    assert len(model.lm_head._forward_pre_hooks) == 1
    assert all(head_inputs(model, input_ids))


def test_model_without_linear_output_head():
    model = lorakit.inject(tiny_bert(), lorakit.LoraConfig(r=4, target_modules=["query", "value"]))
    assert get_state(model).hooks == []
    lorakit.unload(model)
