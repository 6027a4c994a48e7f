"""``lorakit convert``: inspecting adapter folders (lorakit's and PEFT's) and converting them
(legacy .bin -> safetensors, fp32 -> fp16/bf16), through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import logits, tiny_bert, tiny_gpt2, tiny_llama
from lorakit.cli import main
from lorakit.convert import inspect_adapter

peft = pytest.importorskip("peft", reason="convert tests read adapters written by the `peft` package: pip install -e '.[dev]'")


def _randomize(params, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _peft_bert(folder: Path, safe: bool = True) -> torch.nn.Module:
    """A PEFT adapter with per-layer ranks, a saved classifier head and lora_bias, saved to `folder`."""
    model = tiny_bert()
    model.name_or_path = "org/tiny-bert"  # what from_pretrained records and PEFT saves
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"query": 2}, modules_to_save=["classifier"], lora_bias=True
    )
    pm = peft.get_peft_model(model, cfg)
    _randomize([p for p in pm.parameters() if p.requires_grad])
    pm.eval().save_pretrained(folder, safe_serialization=safe)
    return pm


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_inspect_lorakit_fused_adapter(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=4, alpha=16))  # GPT-2 default: c_attn q and v slices
    lorakit.save_adapter(model, tmp_path)
    assert main(["convert", "inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    trainable, _ = lorakit.trainable_parameters(model)
    for line in ("rank r       4\n", "alpha        16\n", "adapted      2 modules: c_attn×2", f"LoRA params  {trainable:,}\n",
                 "fused        2 fused projections adapted slice by slice [x-x]", "written by lorakit", "lorakit      loads it"):
        assert line in text


def test_inspect_peft_adapter_as_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pm = _peft_bert(tmp_path)
    assert main(["convert", "inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    lora = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    head = sum(p.numel() for p in pm.base_model.model.classifier.modules_to_save["default"].parameters())
    assert info["lora_params"] == lora and sum(info["other_tensors"].values()) == head
    assert {layer["path"]: layer["r"] for layer in info["layers"]} == {
        f"bert.encoder.layer.{i}.attention.self.{m}": (2 if m == "query" else 4) for i in (0, 1) for m in ("query", "value")
    }
    assert info["base_model"] == "org/tiny-bert" and info["written_by"] == f"PEFT {peft.__version__}"
    _, tensors, _ = lorakit.read_adapter(tmp_path)
    assert info["dtypes"] == {"float32": len(tensors)}
    assert info["modules_to_save"] == ["classifier"] and info["lora_bias"] and info["loadable"] == "yes"
    assert info["size_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size


def test_inspect_names_what_lorakit_refuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path)
    assert main(["convert", "inspect", str(tmp_path)]) == 0
    assert "lorakit      refuses it: " in (out := capsys.readouterr().out) and "use_dora=True" in out


def test_bin_to_safetensors(tmp_path: Path, input_ids: torch.Tensor) -> None:
    pm = _peft_bert(tmp_path / "bin", safe=False)
    before = _files(tmp_path / "bin")
    assert main(["convert", str(tmp_path / "bin"), "--out", str(tmp_path / "st")]) == 0
    assert _files(tmp_path / "bin") == before  # the source is never touched
    assert sorted(_files(tmp_path / "st")) == ["adapter_config.json", "adapter_model.safetensors"]
    old = torch.load(tmp_path / "bin" / "adapter_model.bin", weights_only=True)
    _, new, _ = lorakit.read_adapter(tmp_path / "st")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    want = logits(pm, input_ids)
    assert torch.equal(logits(lorakit.load_adapter(tiny_bert(), tmp_path / "st"), input_ids), logits(lorakit.load_adapter(tiny_bert(), tmp_path / "bin"), input_ids))
    assert (logits(peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "st"), input_ids) - want).abs().max() <= 1e-5


def test_plain_convert_of_a_lorakit_folder_is_byte_for_byte(tmp_path: Path) -> None:
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=4, alpha=8))
    _randomize(lorakit.adapter_parameters(model).values())
    lorakit.save_adapter(model, tmp_path / "a")
    assert main(["convert", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


@pytest.mark.parametrize("dtype, torch_dtype, tol", [("fp16", torch.float16, 2e-2), ("bf16", torch.bfloat16, 1e-1)])
def test_precision_conversion_keeps_lorakit_config(tmp_path: Path, input_ids: torch.Tensor, dtype: str, torch_dtype: torch.dtype, tol: float) -> None:
    model = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=4, alpha=8))  # fused slices: lorakit's own config in the header
    _randomize(lorakit.adapter_parameters(model).values())
    want = logits(model, input_ids)
    lorakit.save_adapter(model, tmp_path / "fp32")
    assert main(["convert", str(tmp_path / "fp32"), "--out", str(tmp_path / dtype), "--dtype", dtype]) == 0
    _, t32, _ = lorakit.read_adapter(tmp_path / "fp32")
    _, t16, cfg = lorakit.read_adapter(tmp_path / dtype)
    assert all(t16[k].dtype == torch_dtype and torch.equal(t16[k], t32[k].to(torch_dtype)) for k in t32)
    assert cfg.enable_lora == {"c_attn": [True, False, True]}
    size = lambda d: (tmp_path / d / "adapter_model.safetensors").stat().st_size  # noqa: E731
    assert size(dtype) < 0.7 * size("fp32")
    loaded = lorakit.load_adapter(tiny_gpt2(), tmp_path / dtype)
    assert 0 < (logits(loaded, input_ids) - want).abs().max() <= tol


def test_bad_inputs_fail_cleanly_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    src, taken = tmp_path / "src", tmp_path / "taken"
    lorakit.save_adapter(model, src)
    lorakit.save_adapter(model, taken)
    before = _files(taken)
    cases = {
        "the source folder": ["convert", str(src), "--out", str(src)],
        "already holds an adapter": ["convert", str(src), "--out", str(taken)],
        "pass --out DIR2": ["convert", str(src)],
        "expected `inspect DIR`": ["convert", str(src), str(src)],
        "does not exist": ["convert", "inspect", str(tmp_path / "nope")],
    }
    for message, argv in cases.items():
        assert main(argv) == 1
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "taken"] and _files(taken) == before


def test_refuses_pickle_and_fp16_overflow(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        next(iter(lorakit.adapter_parameters(model).values())).fill_(1e6)
    lorakit.save_adapter(model, tmp_path / "big")
    assert main(["convert", str(tmp_path / "big"), "--out", str(tmp_path / "out"), "--dtype", "fp16"]) == 1
    assert "overflows torch.float16" in (err := capsys.readouterr().err) and "use bf16" in err
    assert not (tmp_path / "out").exists()
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    torch.save({"x": torch.nn.Linear(2, 2)}, evil / "adapter_model.bin")  # a module object: needs full unpickling
    assert main(["convert", str(evil), "--out", str(tmp_path / "out")]) == 1
    assert "needs full unpickling" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inspect_adapter_api_matches_the_folder(tmp_path: Path) -> None:
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", use_rslora=True)).save_pretrained(tmp_path)
    info = inspect_adapter(tmp_path)
    assert len(info.layers) == 14 and {layer.r for layer in info.layers} == {8}
    assert all(layer.scale == pytest.approx(32 / 8**0.5) for layer in info.layers)


@pytest.mark.parametrize("key, value", [("lora_alpha", None), ("r", None), ("r", "abc"), ("alpha_pattern", {"q_proj": "x"})])
def test_inspect_reports_a_damaged_config_instead_of_crashing(tmp_path, capsys, key, value):
    lorakit.save_adapter(lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8)), tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    fields[key] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(fields))
    assert main(["convert", "inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "lorakit      refuses it: " in out and key in out.split("refuses it: ")[1]


def test_inspect_does_not_promise_a_load_for_files_without_lora_tensors_or_prefix(tmp_path):
    from safetensors.torch import load_file, save_file

    lorakit.save_adapter(lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8)), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, file)
    assert "lack PEFT's 'base_model.model.' prefix" in inspect_adapter(tmp_path).loadable
    save_file({"other": torch.zeros(2)}, file)
    assert "no LoRA tensors" in inspect_adapter(tmp_path).loadable
