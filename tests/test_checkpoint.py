"""The adapter folder (PEFT layout): round trips, byte-for-byte stability, refusal of bad files, atomicity."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
import lorakit.checkpoint as ckpt
from conftest import BUILDERS, logits, tiny_bert, tiny_gpt2, tiny_llama
from lorakit.adapters import randomize_adapters
from lorakit.layers import LoraLayer
from lorakit.state import get_state

CONFIGS = {
    "llama": lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2}),
    "gpt2": lorakit.LoraConfig(r=4, alpha=8, lora_bias=True, exclude_modules=["wte", "wpe"]),  # c_attn q,v slices
    "bert": lorakit.LoraConfig(r=4, alpha=8, use_rslora=True, bias="all", modules_to_save=["classifier"], init="gaussian"),
}


def _trained(arch: str, seed: int = 0, cfg: lorakit.LoraConfig | None = None) -> nn.Module:
    """A model with a random non-zero adapter and, where saved, changed head and biases (as after training)."""
    model = lorakit.inject(BUILDERS[arch](seed=seed), cfg or CONFIGS[arch])
    randomize_adapters(model, std=0.1, seed=seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not any(p is q for m in model.modules() if isinstance(m, LoraLayer)
                                           for q in (*m.lora_A.values(), *m.lora_B.values(), *m.lora_B_bias.values())):
                p.add_(0.1)
    return model


def _snapshot(model: nn.Module) -> tuple:
    return (
        [(p, type(m)) for p, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        lorakit.list_adapters(model),
        lorakit.active_adapters(model),
        [(p, list(m.merged_adapters), list(m.active_adapters)) for p, m in model.named_modules() if isinstance(m, LoraLayer)],
    )


def _assert_same(before: tuple, after: tuple) -> None:
    assert before[0] == after[0]
    assert list(before[1]) == list(after[1])
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2:] == after[2:]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- round trips ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(BUILDERS))
def test_save_then_load_into_a_fresh_base_reproduces_outputs(arch, tmp_path, input_ids):
    model = _trained(arch)
    out = logits(model, input_ids)
    assert lorakit.save_adapter(model, tmp_path / "out") == tmp_path / "out"
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = BUILDERS[arch]()
    assert not torch.allclose(logits(fresh, input_ids), out, atol=1e-4)
    assert lorakit.load_adapter(fresh, tmp_path / "out") is fresh
    torch.testing.assert_close(logits(fresh, input_ids), out, atol=1e-6, rtol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_save_load_save_is_byte_for_byte_identical(arch, tmp_path):
    lorakit.save_adapter(_trained(arch), tmp_path / "one")
    fresh = lorakit.load_adapter(BUILDERS[arch](), tmp_path / "one")
    lorakit.save_adapter(fresh, tmp_path / "two")
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_folder_is_peft_layout(tmp_path):
    lorakit.save_adapter(_trained("llama"), tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["peft_type"] == "LORA" and fields["r"] == 4 and fields["lora_alpha"] == 8
    assert sorted(fields["target_modules"]) == ["embed_tokens", "q_proj", "v_proj"]
    # per-layer values as exact-path keys: no two keys match one module, so key order (PEFT re-sorts) cannot matter
    assert fields["rank_pattern"] == {rf"model\.layers\.{i}\.self_attn\.v_proj": 2 for i in (0, 1)} and fields["use_dora"] is False
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 2)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 128)
    assert all(".lora_" in k for k in tensors)
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as f:
        assert f.metadata()["format"] == "pt"


def test_save_in_half_precision(tmp_path, input_ids):
    model = _trained("llama")
    lorakit.save_adapter(model, tmp_path, dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in load_file(tmp_path / "adapter_model.safetensors").values())
    fresh = lorakit.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(fresh, input_ids), logits(model, input_ids), atol=1e-2, rtol=1e-2)


def test_saving_in_fp16_values_it_cannot_hold_is_refused_and_the_folder_kept(saved):
    before = _files(saved)
    model = _trained("llama", seed=3)
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, LoraLayer)).lora_B["default"].fill_(1e6)  # > fp16's 65504
    with pytest.raises(ValueError, match=r"lora_(embedding_)?B(.weight)? overflows torch.float16 .*use bf16"):
        lorakit.save_adapter(model, saved, dtype=torch.float16)
    assert _files(saved) == before
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, LoraLayer)).lora_A["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="overflows torch.float16"):  # an inf already in the tensor does not hide it
        lorakit.save_adapter(model, saved, dtype=torch.float16)
    lorakit.save_adapter(model, saved, dtype=torch.bfloat16)  # bf16 has fp32's range
    assert sum((~torch.isfinite(t)).sum().item() for t in load_file(saved / "adapter_model.safetensors").values()) == 1


def test_load_beside_another_adapter_and_under_a_taken_name(tmp_path, input_ids):
    lorakit.save_adapter(_trained("llama"), tmp_path)
    model = _trained("llama", seed=0, cfg=lorakit.LoraConfig(r=2, target_modules=["o_proj"]))
    lorakit.load_adapter(model, tmp_path, adapter="loaded")
    assert lorakit.list_adapters(model) == ["default", "loaded"] and lorakit.active_adapters(model) == ["loaded"]
    before = _snapshot(model)
    with pytest.raises(ValueError, match="adapter 'loaded' is already on the model"):
        lorakit.load_adapter(model, tmp_path, adapter="loaded")
    _assert_same(before, _snapshot(model))


def test_plain_tensor_dict_bin_loads_through_weights_only(tmp_path, input_ids):
    model = _trained("llama", cfg=lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(dict(lorakit.adapter_state_dict(model)), tmp_path / "adapter_model.bin")
    fresh = lorakit.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(fresh, input_ids), logits(model, input_ids), atol=1e-6, rtol=0)


# ---- files that do not fit the model ------------------------------------------------------------

def test_wrong_shape_names_key_and_both_shapes_and_leaves_model_unchanged(tmp_path):
    lorakit.save_adapter(_trained("llama"), tmp_path)
    model = tiny_llama(vocab=96)  # the adapter's embedding LoRA is for 128 tokens
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.lora_embedding_A: file has shape \[4, 128\], model expects \[4, 96\]"):
        lorakit.load_adapter(model, tmp_path)
    _assert_same(before, _snapshot(model))
    assert "_lorakit" not in model.__dict__


def test_edited_tensor_shape_is_reported(tmp_path):
    lorakit.save_adapter(_trained("llama"), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(32, 3)
    save_file(tensors, file)
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{key.replace('.', '[.]')}: file has shape \[32, 3\], model expects \[32, 4\]"):
        lorakit.load_adapter(model, tmp_path)
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_naming_the_tensor(tmp_path, bad):
    lorakit.save_adapter(_trained("bert"), tmp_path)  # LoRA factors and a saved classifier head
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    keys = ["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight", "base_model.model.classifier.bias"]
    for key in keys:
        tensors[key].view(-1)[:2] = bad
    save_file(tensors, file, metadata=safe_open(file, "pt").metadata())
    model = tiny_bert()
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:  # one such value turns every output row it reaches into NaN
        lorakit.load_adapter(model, tmp_path)
    for key in keys:
        assert f"{key}: 2 of {tensors[key].numel()} values are NaN or inf" in str(info.value)
    assert "the model is unchanged" in str(info.value)
    _assert_same(before, _snapshot(model))


def test_a_base_weight_saved_alongside_may_hold_the_bases_own_inf(tmp_path):
    peft = pytest.importorskip("peft")

    def base() -> torch.nn.Module:
        model = tiny_llama()
        with torch.no_grad():
            model.lm_head.weight[5, 0] = float("inf")  # the base model's own value, not a diverged adapter's
        return model

    peft_model = peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path, save_embedding_layers=["lm_head"])
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if "lm_head" in k)
    lorakit.load_adapter(base(), tmp_path)
    tensors[key][7, :2] = float("nan")  # values the base does not hold: the file's own
    save_file(tensors, file, metadata=safe_open(file, "pt").metadata())
    with pytest.raises(ValueError, match=rf"{re.escape(key)}: 2 of {tensors[key].numel()} values are NaN or inf"):
        lorakit.load_adapter(base(), tmp_path)


def test_a_trained_bias_with_nan_is_refused(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"], bias="all"))
    lorakit.save_adapter(model, tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.0.base_layer.bias"
    tensors[key][0] = float("nan")
    save_file(tensors, file, metadata=safe_open(file, "pt").metadata())
    fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=rf"{re.escape(key)}: 1 of 4 values are NaN or inf"):
        lorakit.load_adapter(fresh, tmp_path)
    _assert_same(before, _snapshot(fresh))


def test_missing_module_names_the_key_and_leaves_model_unchanged(tmp_path):
    lorakit.save_adapter(_trained("llama"), tmp_path)
    model = tiny_llama(layers=1)  # the adapter also has layer 1
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"unexpected key base_model\.model\.model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight "
                                         r"\(shape \[4, 32\]\): no such module in this model"):
        lorakit.load_adapter(model, tmp_path)
    _assert_same(before, _snapshot(model))


def test_unexpected_key_of_a_module_the_config_leaves_alone_says_the_module_exists(tmp_path):
    lorakit.save_adapter(_trained("llama"), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    tensors["base_model.model.model.norm.weight"] = torch.ones(32)
    save_file(tensors, file, metadata=safe_open(file, "pt").metadata())
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError) as info:
        lorakit.load_adapter(model, tmp_path)
    for module in ("model.layers.0.mlp.up_proj", "model.norm"):
        assert (f"module {module!r} exists in this model, but the adapter config neither targets nor saves it "
                "(target_modules / modules_to_save)") in str(info.value)
    assert "no such module" not in str(info.value)
    _assert_same(before, _snapshot(model))


def test_missing_tensor_in_file_names_the_key_and_expected_shape(tmp_path):
    lorakit.save_adapter(_trained("bert"), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    del tensors["base_model.model.classifier.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    model = tiny_bert()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"missing key base_model\.model\.classifier\.weight \(the model expects shape \[3, 32\]\)"):
        lorakit.load_adapter(model, tmp_path)
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("existing", [False, True])
def test_failure_after_injection_rolls_everything_back(tmp_path, existing):
    """A fused-slice B with weight outside its q/v blocks passes the shape check and fails while copying."""
    cfg = lorakit.LoraConfig(r=2, alpha=4, bias="all", modules_to_save=["ln_f"])
    lorakit.save_adapter(_trained("gpt2", cfg=cfg), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"][40, 0] = 1.0  # a k row
    save_file(tensors, file, metadata=metadata)
    model = tiny_gpt2()
    if existing:
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_fc"], modules_to_save=["ln_f"]), adapter="first")
        randomize_adapters(model)
        lorakit.merge(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="block structured"):
        lorakit.load_adapter(model, tmp_path, adapter="second")
    _assert_same(before, _snapshot(model))
    assert ("_lorakit" in model.__dict__) == existing


# ---- broken and unsafe files --------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path) -> Path:
    lorakit.save_adapter(_trained("llama"), tmp_path)
    return tmp_path


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_truncated_or_corrupted_safetensors_is_a_clear_error(saved, damage):
    file = saved / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncate": data[: len(data) // 2], "garbage_header": b"\xff" * 8 + data[8:], "empty": b""}[damage])
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        lorakit.load_adapter(model, saved)
    _assert_same(before, _snapshot(model))


def test_bad_json_is_a_clear_error(saved):
    (saved / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_json_that_is_not_an_object_is_a_clear_error(saved):
    (saved / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        lorakit.load_adapter(tiny_llama(), saved)


@pytest.mark.parametrize("key", ["use_rslora", "lora_bias"])
def test_true_false_field_that_is_not_a_bool_is_a_clear_error(saved, key):
    """bool("false") is True: a string there would silently change the scale (rsLoRA) or add a bias."""
    fields = json.loads((saved / "adapter_config.json").read_text())
    fields[key] = "false"
    (saved / "adapter_config.json").write_text(json.dumps(fields))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"{key} must be true or false, got 'false'"):
        lorakit.load_adapter(model, saved)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and len(before) == len(model.state_dict())


def test_edited_adapter_config_json_wins_as_in_peft(saved, caplog):
    """The JSON is what PEFT reads; lorakit's copy in the safetensors header must not override an edit."""
    fields = json.loads((saved / "adapter_config.json").read_text())
    fields["lora_alpha"] = 4 * fields["lora_alpha"]
    (saved / "adapter_config.json").write_text(json.dumps(fields))
    model = lorakit.load_adapter(tiny_llama(), saved)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_specs["default"].alpha == fields["lora_alpha"]
    assert "differs from the config lorakit saved" in caplog.text


def test_unedited_lorakit_folder_keeps_its_fused_slices(tmp_path):
    """enable_lora is not a PEFT field: an unedited lorakit folder loads its slices from the header copy."""
    lorakit.save_adapter(_trained("gpt2"), tmp_path)
    model = lorakit.load_adapter(tiny_gpt2(), tmp_path)
    assert model.transformer.h[0].attn.c_attn.lora_specs["default"].enabled == (True, False, True)


def test_loading_into_a_meta_model_is_a_clear_error_and_leaves_it_unchanged(saved):
    with torch.device("meta"):
        model = tiny_llama()
    before = [(p, type(m)) for p, m in model.named_modules()]
    with pytest.raises(ValueError, match="meta device"):
        lorakit.load_adapter(model, saved)
    assert [(p, type(m)) for p, m in model.named_modules()] == before and not lorakit.list_adapters(model)


def test_saved_files_get_the_permissions_open_would_give(saved):
    mask = os.umask(0)
    os.umask(mask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (saved / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_missing_folder_or_files_are_clear_errors(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors' is a file; pass the adapter folder that holds it"):
        lorakit.load_adapter(tiny_llama(), saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has neither adapter_model.safetensors nor adapter_model.bin"):
        lorakit.load_adapter(tiny_llama(), saved)
    (saved / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        lorakit.load_adapter(tiny_llama(), saved)


class _Payload:
    """Unpickling this object would create a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_needs_full_unpickling_is_refused_and_never_run(saved):
    marker = saved / "ran"
    (saved / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(1), "payload": _Payload(marker)}, saved / "adapter_model.bin")
    with pytest.raises(ValueError, match="needs full unpickling.*refuses"):
        lorakit.load_adapter(tiny_llama(), saved)
    assert not marker.exists()


def test_truncated_bin_is_a_clear_error(saved):
    (saved / "adapter_model.safetensors").unlink()
    torch.save({"w": torch.zeros(64)}, saved / "adapter_model.bin")
    data = (saved / "adapter_model.bin").read_bytes()
    (saved / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_bin_that_is_not_a_tensor_dict_is_refused(saved):
    (saved / "adapter_model.safetensors").unlink()
    torch.save([torch.zeros(1)], saved / "adapter_model.bin")
    with pytest.raises(ValueError, match="does not hold a dict of tensors"):
        lorakit.load_adapter(tiny_llama(), saved)


# ---- atomic writes ------------------------------------------------------------------------------

@pytest.mark.parametrize("fail_at", ["serialize", "write_second_file", "replace_config", "replace_weights"])
def test_a_failed_save_leaves_the_previous_files_intact(saved, monkeypatch, fail_at):
    before = _files(saved)
    other = _trained("llama", seed=5, cfg=CONFIGS["llama"].replace(alpha=4 * CONFIGS["llama"].alpha))  # another config too
    real_replace, real_fsync, synced = os.replace, os.fsync, []

    def fsync(fd):  # the disk fills while the second file is written: the first is not renamed in yet
        synced.append(fd)
        if len(synced) == 2:
            raise OSError("disk full")
        return real_fsync(fd)

    def replace(src, dst):
        if Path(dst).name == {"replace_config": "adapter_config.json", "replace_weights": "adapter_model.safetensors"}[fail_at]:
            raise OSError("disk full")
        return real_replace(src, dst)

    if fail_at == "serialize":
        monkeypatch.setattr(ckpt, "st_save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    elif fail_at == "write_second_file":
        monkeypatch.setattr(ckpt.os, "fsync", fsync)
    else:
        monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises((OSError, RuntimeError)):
        lorakit.save_adapter(other, saved)
    after = _files(saved)
    if fail_at != "replace_config":
        assert after == before  # no temp files left behind
        return
    # the new weights are in, the new config is not: the config's temp file stays, and loading says what happened
    (stray,) = set(after) - set(before)
    assert stray.startswith(".adapter_config.json.") and after["adapter_config.json"] == before["adapter_config.json"]
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"interrupted.*{re.escape(stray)}.*rename it to adapter_config.json"):
        lorakit.load_adapter(model, saved)
    assert get_state(model, required=False) is None
    monkeypatch.undo()
    os.replace(saved / stray, saved / "adapter_config.json")  # finishing the save by hand, as the error says
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(logits(lorakit.load_adapter(tiny_llama(seed=5), saved), ids), logits(other, ids), atol=1e-6, rtol=0)


def test_atomic_write_bytes_replaces_whole_files_only(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    ckpt.atomic_write_bytes(target, b"old")
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("io error")))
    with pytest.raises(OSError):
        ckpt.atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_saving_a_meta_model_is_a_clear_error(tmp_path):
    with torch.device("meta"):
        model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="meta device"):
        lorakit.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_load_into_a_merged_model_applies_the_loaded_update(tmp_path, input_ids):
    lorakit.save_adapter(_trained("llama"), tmp_path)
    expected = logits(lorakit.load_adapter(tiny_llama(), tmp_path), input_ids)
    model = _trained("llama", cfg=lorakit.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    lorakit.merge(model)
    lorakit.load_adapter(model, tmp_path, adapter="second")  # becomes the active adapter, merged
    assert any("second" in m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-5, rtol=0)


def test_metadata_order_is_stable_across_saves(tmp_path):
    model = _trained("gpt2")
    files = {lorakit.save_adapter(model, tmp_path / str(i)) / "adapter_model.safetensors" for i in range(6)}
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(next(iter(files)), framework="pt") as f:
        assert set(f.metadata()) == {"format", "lorakit_config"}


def test_adapter_of_another_architecture_is_refused_and_model_unchanged(tmp_path):
    source = _trained("llama", cfg=lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    source.config._name_or_path = "org/tiny-llama"
    lorakit.save_adapter(source, tmp_path)
    model = tiny_gpt2()
    model.config._name_or_path = "org/tiny-gpt2"
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"(?s)matched no module.*trained on 'org/tiny-llama'; this model is "
                                         r"GPT2LMHeadModel from 'org/tiny-gpt2': if that is another model, load the adapter onto its own"):
        lorakit.load_adapter(model, tmp_path)
    _assert_same(before, _snapshot(model))
    assert "_lorakit" not in model.__dict__


@pytest.mark.parametrize("key, value, message", [
    ("r", "four", "r must be a positive integer, got 'four'"),
    ("r", 4.7, "r must be a positive integer, got 4.7"),
    ("r", None, "r must be a positive integer, got None"),
    ("lora_alpha", None, "lora_alpha must be a positive number, got None"),
    ("lora_dropout", "abc", "lora_dropout must be a number in"),
    ("rank_pattern", ["x"], "rank_pattern must be an object"),
    ("layers_to_transform", "0", "layers must be a block index"),
])
def test_config_field_of_the_wrong_kind_names_the_folder_and_field(saved, key, value, message):
    fields = json.loads((saved / "adapter_config.json").read_text())
    fields[key] = value
    (saved / "adapter_config.json").write_text(json.dumps(fields))
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=re.escape(str(saved))) as info:
        lorakit.load_adapter(model, saved)
    assert message in str(info.value)
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("header", ['{"r": 8, "new_field": 1}', "{not json", "[1]"])
def test_unreadable_or_newer_lorakit_header_copy_falls_back_to_adapter_config_json(saved, header, caplog):
    """adapter_config.json is authoritative: a damaged or newer header copy costs only a warning."""
    file = saved / "adapter_model.safetensors"
    want = logits(lorakit.load_adapter(tiny_llama(), saved), torch.tensor([[1, 5, 9, 3]]))
    save_file(load_file(file), file, metadata={"format": "pt", "lorakit_config": header})
    model = lorakit.load_adapter(tiny_llama(), saved)
    assert torch.equal(logits(model, torch.tensor([[1, 5, 9, 3]])), want)
    assert "lorakit config" in caplog.text


def test_a_header_copy_whose_fused_slices_no_longer_plan_gives_way_to_adapter_config_json(tmp_path, caplog):
    """An older lorakit accepted an enable_lora key matching no module (its layer trained dense): now refused by
    inject, so the header copy gives way to the JSON, which describes the dense LoRA the file holds."""
    model = _trained("gpt2", cfg=lorakit.LoraConfig(r=2, target_modules=["c_attn"]))  # dense, as that layer trained
    lorakit.save_adapter(model, tmp_path)
    file = tmp_path / ckpt.WEIGHTS_NAME
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
    stored = json.loads(metadata[ckpt.METADATA_KEY])
    stored["enable_lora"] = {"c_atn": [True, False, True]}  # the typo an older version let through
    save_file(load_file(file), file, metadata={**metadata, ckpt.METADATA_KEY: json.dumps(stored)})
    ids = torch.tensor([[1, 5, 9, 3]])
    loaded = lorakit.load_adapter(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))
    assert loaded.transformer.h[0].attn.c_attn.lora_specs["default"].enabled is None
    assert "differs from the config lorakit saved" in caplog.text


def test_save_adapter_bad_dtype_or_file_path_is_a_clear_error_and_home_is_expanded(saved, tmp_path, monkeypatch):
    model = _trained("llama")
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        lorakit.save_adapter(model, tmp_path / "x", dtype="fp16")
    with pytest.raises(FileExistsError, match="is a file; save_adapter writes a folder"):
        lorakit.save_adapter(model, saved / "adapter_config.json")
    assert not (tmp_path / "x").exists()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert lorakit.save_adapter(model, "~/home_adapter") == tmp_path / "home_adapter"
    assert (tmp_path / "home_adapter" / "adapter_config.json").is_file()


def test_saving_while_merged_writes_the_unmerged_trained_bias_and_lora_bias(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    fresh.load_state_dict(model.state_dict())
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["0"], bias="lora_only", lora_bias=True))
    randomize_adapters(model, std=0.3, seed=1)
    x = torch.randn(3, 8)
    with torch.no_grad():
        model[0].bias.add_(0.5)
        ref = model(x)
    unmerged = {k: v.clone() for k, v in lorakit.adapter_state_dict(model).items()}
    lorakit.merge(model)
    lorakit.save_adapter(model, tmp_path / "a")
    assert all(torch.equal(unmerged[k], v) for k, v in load_file(tmp_path / "a" / ckpt.WEIGHTS_NAME).items())
    lorakit.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(x), ref, rtol=0, atol=1e-6)


def test_a_fused_layers_lora_bias_is_written_as_applied_zero_on_slices_it_leaves_alone():
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=2, target_modules=["c_attn"], enable_lora={"c_attn": [True, False, True]},
                                                           lora_bias=True))
    randomize_adapters(model, std=0.1, seed=0)  # fills the k slice of the bias too, which never trains
    bias = lorakit.adapter_state_dict(model)["base_model.model.transformer.h.0.attn.c_attn.lora_B.bias"]
    q, k, v = bias.chunk(3)
    assert q.abs().sum() > 0 and v.abs().sum() > 0 and torch.equal(k, torch.zeros_like(k))


def _with_base_embedding(model: nn.Module, folder: Path) -> Path:
    """`folder`'s embedding adapter plus a base embedding that differs from the model's (as PEFT saves a resized one)."""
    tensors = load_file(folder / ckpt.WEIGHTS_NAME)
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] = model.model.embed_tokens.weight.detach() + 0.5
    save_file(tensors, folder / ckpt.WEIGHTS_NAME)
    return folder


def _assert_put_back(model: nn.Module, base: nn.Module, how: str, input_ids: torch.Tensor) -> None:
    """The base embedding is back: inside disable_adapters, after unload, or after delete_adapter (`how`)."""
    if how == "disable":
        with lorakit.disable_adapters(model):
            torch.testing.assert_close(logits(model, input_ids), logits(base, input_ids), rtol=0, atol=0)
        return
    model = lorakit.unload(model) if how == "unload" else model
    if how == "delete":
        lorakit.delete_adapter(model, "default")
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


@pytest.mark.parametrize("how", ["delete", "unload", "disable"])
def test_a_base_embedding_loaded_from_a_file_is_put_back_on_delete_unload_and_inside_disable(tmp_path, how, input_ids):
    source = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    randomize_adapters(source, std=0.1, seed=0)
    folder = _with_base_embedding(tiny_llama(), lorakit.save_adapter(source, tmp_path / "a"))
    model, base = tiny_llama(), tiny_llama()
    lorakit.load_adapter(model, folder)
    assert not torch.equal(logits(model, input_ids), logits(base, input_ids))
    _assert_put_back(model, base, how, input_ids)


def test_layers_empty_means_every_block_and_a_full_path_target_ignores_layers():
    every = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"], layers=[]))
    assert len(get_state(every).adapters["default"].layers) == 2
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], layers=[0]))
    assert get_state(model).adapters["default"].layers == ["model.layers.0.self_attn.q_proj", "lm_head"]


def test_a_header_config_that_plans_other_modules_than_the_file_holds_gives_way_to_adapter_config_json(tmp_path, input_ids, caplog):
    """Older lorakit versions filtered full-path targets by `layers` too: the header config of such a file
    (q_proj + lm_head, layers=[0]) plans lm_head today, which the file lacks, so the JSON's module list is used."""
    model = _trained("llama", cfg=lorakit.LoraConfig(r=2, target_modules=["q_proj"], layers=[0]))
    folder = lorakit.save_adapter(model, tmp_path / "a")
    file = folder / ckpt.WEIGHTS_NAME
    old = {**get_state(model).adapters["default"].config.to_dict(), "target_modules": ["q_proj", "lm_head"]}
    save_file(load_file(file), file, metadata={"format": "pt", "lorakit_config": json.dumps(old)})
    loaded = lorakit.load_adapter(tiny_llama(), folder)
    assert get_state(loaded).adapters["default"].layers == ["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=0, atol=1e-6)
    assert "differs from the config lorakit saved" in caplog.text


def test_a_listed_config_is_recovered_when_loaded_beside_an_adapter_on_the_same_modules(tmp_path, caplog):
    """The header config is planned under the name it loads as, not under another adapter's name on those modules."""
    cfg = lorakit.LoraConfig(r=2, target_modules="all-linear", enable_lora={"q_proj": [True, False]})
    folder = lorakit.save_adapter(_trained("llama", cfg=cfg), tmp_path / "a")
    model = lorakit.load_adapter(_trained("llama", cfg=cfg), folder, adapter="b")
    assert get_state(model).adapters["b"].config == get_state(model).adapters["default"].config == cfg
    assert "differs" not in caplog.text


def _with_plain_embeddings(folder: Path, arch: str, shifts: dict[str, float]) -> Path:
    """`folder`'s adapter plus base weights of `arch`'s embedding layers under their plain names (PEFT's
    save_embedding_layers for modules without LoRA): `shifts` maps a parameter name to the shift from the model's."""
    tensors = load_file(folder / ckpt.WEIGHTS_NAME)
    params = dict(BUILDERS[arch]().named_parameters(remove_duplicate=False))
    for pname, shift in shifts.items():
        tensors[f"base_model.model.{pname}"] = params[pname].detach() + shift
    save_file(tensors, folder / ckpt.WEIGHTS_NAME)
    return folder


@pytest.mark.parametrize("how", ["delete", "unload", "disable"])
def test_plain_named_embedding_weights_from_a_file_are_loaded_and_put_back(tmp_path, how, input_ids):
    """q,v only; the file also holds model.embed_tokens.weight (changed) and lm_head.weight (as the model's)."""
    source = _trained("llama", cfg=lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    folder = _with_plain_embeddings(lorakit.save_adapter(source, tmp_path / "a"), "llama",
                                    {"model.embed_tokens.weight": 0.5, "lm_head.weight": 0.0})
    model, base = tiny_llama(), tiny_llama()
    lorakit.load_adapter(model, folder)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight + 0.5)
    assert get_state(model).adapters["default"].base_params == ["model.embed_tokens.weight"]
    assert set(lorakit.adapter_state_dict(model)) - set(lorakit.adapter_state_dict(source)) == {
        "base_model.model.model.embed_tokens.weight"}
    _assert_put_back(model, base, how, input_ids)


def test_a_tied_embedding_is_one_weight_under_either_name(tmp_path):
    """GPT-2 ties lm_head to transformer.wte: a file's two names for it must agree, and a weight another adapter
    set under one name is held under the other too (refused with other values, shared with the same)."""
    cfg = lorakit.LoraConfig(r=2, target_modules=["c_attn"])
    def folder(name: str, **shifts: float) -> Path:
        return _with_plain_embeddings(lorakit.save_adapter(_trained("gpt2", cfg=cfg), tmp_path / name), "gpt2", shifts)

    model, base = tiny_gpt2(), tiny_gpt2()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"give different values to one tensor of this model \(tied as "
                                         r"\['transformer\.wte\.weight', 'lm_head\.weight'\]\)"):
        lorakit.load_adapter(model, folder("both", **{"transformer.wte.weight": 0.5, "lm_head.weight": 1.0}))
    _assert_same(before, _snapshot(model))
    lorakit.load_adapter(model, folder("a", **{"transformer.wte.weight": 0.5}), adapter="a")
    assert torch.equal(model.lm_head.weight, base.lm_head.weight + 0.5) and model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError, match=r"changes the base model's 'lm_head\.weight', which adapter 'a' already set"):
        lorakit.load_adapter(model, folder("b", **{"lm_head.weight": 1.0}), adapter="b")
    lorakit.load_adapter(model, folder("c", **{"lm_head.weight": 0.5}), adapter="c")
    assert get_state(model).adapters["c"].base_params == ["transformer.wte.weight"]  # shared as "a" holds it
    lorakit.delete_adapter(model, "a")
    assert torch.equal(model.lm_head.weight, base.lm_head.weight + 0.5)  # "c" was trained on it too
    lorakit.delete_adapter(model, "c")
    assert torch.equal(model.transformer.wte.weight, base.transformer.wte.weight)


def test_per_layer_rank_keys_read_back_from_adapter_config_json_alone(tmp_path):
    """The exact-path keys written for module names with regex characters match only their own module in lorakit
    too (read from adapter_config.json, without lorakit's copy of the config in the weights' header)."""
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.ModuleDict({"q+v": nn.Linear(8, 8), "qqv": nn.Linear(8, 8)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks["qqv"](self.blocks["q+v"](x))

    model = lorakit.inject(Odd(), lorakit.LoraConfig(r=4, alpha=8, target_modules=["q+v", "qqv"], rank_pattern={r"q\+v": 2}))
    randomize_adapters(model, std=0.1)
    file = lorakit.save_adapter(model, tmp_path) / ckpt.WEIGHTS_NAME
    save_file(load_file(file), file, metadata={"format": "pt"})  # no lorakit config: adapter_config.json only
    loaded = lorakit.load_adapter(Odd(), tmp_path)
    assert [loaded.blocks[n].lora_specs["default"].r for n in ("q+v", "qqv")] == [2, 4]
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)


def test_a_load_that_fails_after_injecting_puts_back_every_requires_grad_flag(tmp_path):
    """Re-merging onto a merged model is refused for a tied embedding adapter: the rollback restores the flags a user
    set outside the adapters too (set_adapter keeps them, so a failed load must not lose them)."""
    source = lorakit.inject(tiny_llama(tie=True), lorakit.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    randomize_adapters(source, std=0.1)
    lorakit.save_adapter(source, tmp_path)
    model = lorakit.inject(tiny_llama(tie=True), lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter="a")
    randomize_adapters(model, std=0.1)
    model.model.norm.weight.requires_grad_(True)
    lorakit.merge(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="tied"):
        lorakit.load_adapter(model, tmp_path, adapter="b")
    _assert_same(before, _snapshot(model))


def _interrupted_save(model: nn.Module, folder: Path, monkeypatch) -> None:
    """save_adapter stopped after the weights' rename, before the config's (as a process killed between them)."""
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == "adapter_config.json":
            raise OSError("killed")
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(ckpt.os, "replace", replace)
        with pytest.raises(OSError, match="killed"):
            lorakit.save_adapter(model, folder)


def _llama(alpha: float, seed: int) -> nn.Module:
    return _trained("llama", seed=seed, cfg=CONFIGS["llama"].replace(alpha=alpha))


def test_only_the_temp_config_that_matches_the_weights_counts_as_an_interrupted_save(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "a"
    lorakit.save_adapter(_llama(2, 1), folder)
    _interrupted_save(_llama(4, 2), folder, monkeypatch)
    _interrupted_save(_llama(8, 3), folder, monkeypatch)  # two stale temps: the weights are alpha 8's
    with pytest.raises(ValueError, match="interrupted") as err:
        lorakit.load_adapter(tiny_llama(seed=3), folder)
    named = re.search(r"is in (\S+): rename", str(err.value)).group(1)
    assert json.loads((folder / named).read_text())["lora_alpha"] == 8
    with pytest.raises(ValueError, match=re.escape(named)):  # convert copies nothing from such a folder
        lorakit.convert_adapter(folder, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()
    lorakit.save_adapter(_llama(16, 4), folder)  # a later save succeeds; the old temps stay behind
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 20}))  # a hand edit, as PEFT allows
    with caplog.at_level("WARNING"):
        model = lorakit.load_adapter(tiny_llama(seed=4), folder)  # not blamed on the stale temps
    assert "differs from the config lorakit saved" in caplog.text
    assert next(m for m in model.modules() if isinstance(m, LoraLayer)).lora_specs["default"].alpha == 20


def test_an_interrupted_first_save_names_its_config(tmp_path, monkeypatch):
    folder = tmp_path / "new"
    _interrupted_save(_llama(4, 2), folder, monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"interrupted.*there is no adapter_config.json yet.*rename it"):
        lorakit.load_adapter(tiny_llama(seed=2), folder)
