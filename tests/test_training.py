"""The trainer on tiny random models: it learns, trains only what it should, and resumes exactly."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import lorakit
from conftest import logits, tiny_bert, tiny_llama
from lorakit import training
from lorakit.data import collate, encode_causal, encode_classification
from lorakit.training import (
    TrainConfig,
    TrainingError,
    causal_lm_loss,
    evaluate,
    finetune,
    latest_checkpoint,
    lr_schedule,
)
from toy_tokenizer import ByteTokenizer
from train_worker import config, examples

HERE = Path(__file__).parent
TOK = ByteTokenizer()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run ~50x faster on one thread than on two contended ones (and the worker uses one too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_few_steps_reduce_the_loss_and_touch_only_adapters(tmp_path):
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    data = examples()
    # the tiny model's frozen random head caps its logits near 0.6, so the head is adapted too
    cfg = TrainConfig(steps=40, lr=1e-2, batch_size=4, precision="fp32", eval_every=40,
                      target_modules=["q_proj", "v_proj", "lm_head"])
    before = training.evaluate(model, encode_causal(TOK, data, 256), cfg, pad_id=0)["eval_loss"]
    result = finetune(model, TOK, data, data, cfg, out_dir=tmp_path)
    assert result.eval_metrics["eval_loss"] < before - 2.0
    lorakit.unload(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 41))
    assert all(r["peak_mb"] > 0 for r in lines if "loss" in r) and result.peak_memory_mb >= lines[-2]["peak_mb"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "adapter_config.json").is_file()


def test_fast_loss_equals_the_models_own_loss():
    model = tiny_llama()
    batch = collate(encode_causal(TOK, examples()[:4], 64), pad_id=0)
    ours, n = causal_lm_loss(model, batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("family", ["granite", "gemma2"])
def test_fast_loss_equals_the_models_own_loss_when_logits_are_scaled_or_capped(family):
    """Granite divides the logits by logits_scaling, Gemma-2 soft-caps them: the loss must see what generate sees."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(logits_scaling=16.0, **common))
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(final_logit_softcapping=0.5, head_dim=8, **common))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits large enough for the scaling or capping to matter
    batch = collate(encode_causal(TOK, examples()[:4], 64), pad_id=0)
    ours, _ = causal_lm_loss(model.eval(), batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, ref)


def test_bf16_base_keeps_trainable_weights_fp32():
    model = tiny_llama()
    result = finetune(model, TOK, examples(), None, TrainConfig(steps=3, precision="bf16", batch_size=4))
    assert result.precision == "bf16"
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name


def test_classification_trains_and_saves_the_head(tmp_path):
    model = tiny_bert(num_labels=2)
    data = [{"text": ("good fine " if i % 2 else "bad awful ") * 2, "label": i % 2} for i in range(32)]
    cfg = TrainConfig(task="classification", steps=30, lr=1e-2, batch_size=8, precision="fp32")
    result = finetune(model, TOK, data, data, cfg, out_dir=tmp_path)
    assert result.eval_metrics["eval_accuracy"] == 1.0
    keys = adapter_tensors(tmp_path)
    assert "base_model.model.classifier.weight" in keys
    assert any(k.endswith("query.lora_A.weight") for k in keys)
    fresh = tiny_bert(num_labels=2)
    lorakit.load_adapter(fresh, tmp_path)
    ids = collate([{"input_ids": [1, 5, 6], "labels": 0}], 0)["input_ids"]
    model.eval()
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    record = json.loads((tmp_path / training.FINISHED_JSON).read_text())
    assert record["num_labels"] == 2 and record["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    with pytest.raises(ValueError, match=r"a head for 2 classes: load the model with num_labels=2"):
        lorakit.load_adapter(tiny_bert(num_labels=3), tmp_path)


def test_full_method_trains_every_parameter():
    model = tiny_llama()
    finetune(model, TOK, examples(), None, TrainConfig(method="full", steps=2, batch_size=4, precision="fp32"))
    assert all(p.requires_grad for p in model.parameters())
    assert lorakit.list_adapters(model) == []


def test_lora_plus_gives_B_a_higher_learning_rate():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    opt = training.build_optimizer(model, TrainConfig(lr=1e-3, lr_ratio_b=16))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 16e-3]
    b_ids = {id(p) for n, p in lorakit.adapter_parameters(model).items() if ".lora_B." in n}
    assert {id(p) for p in opt.param_groups[1]["params"]} == b_ids


def test_weight_decay_skips_biases_and_norm_weights():
    model = tiny_bert(num_labels=2)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    opt = training.build_optimizer(model, TrainConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    kept = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert any(n.endswith("lora_A.default") for n in decayed) and "classifier.modules_to_save.default.weight" in decayed
    assert kept == {"classifier.modules_to_save.default.bias"}
    full = tiny_bert(num_labels=2)
    opt = training.build_optimizer(full, TrainConfig(weight_decay=0.1))
    undecayed = [p for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert undecayed and all(p.dim() == 1 for p in undecayed)  # LayerNorms and biases
    assert len(training.build_optimizer(model, TrainConfig()).param_groups) == 1  # no decay: one group, as before


def test_schedule_warms_up_then_decays_to_zero():
    f = lr_schedule(10, 4)
    assert [round(f(s), 2) for s in range(10)] == [0.2, 0.4, 0.6, 0.8, 1.0, 0.83, 0.67, 0.5, 0.33, 0.17]
    cosine = lr_schedule(10, 4, "cosine")  # 0.5·(1 + cos(π·t)), t = decay progress: 0 → 1
    assert [round(cosine(s), 2) for s in range(10)] == [0.2, 0.4, 0.6, 0.8, 1.0, 0.93, 0.75, 0.5, 0.25, 0.07]
    assert [lr_schedule(10, 0.2, "constant")(s) for s in range(10)] == [1 / 3, 2 / 3] + [1.0] * 8
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="step")


@pytest.mark.parametrize("field, value, message", [
    ("warmup", float("nan"), "warmup must be a finite number >= 0"), ("max_grad_norm", -1.0, "max_grad_norm must be"),
    ("save_every", -1, r"save_every must be an integer >= 0 \(0: never\)"), ("eval_every", 2.5, "eval_every must be"),
    ("batch_size", 0, "batch_size must be a positive integer"), ("steps", 0, "steps must be a positive integer"),
    ("lr", float("inf"), "lr must be a finite number > 0"), ("epochs", float("inf"), "epochs must be a finite"),
    ("lr_ratio_b", 0.0, "lr_ratio_b must be a finite number > 0"), ("seed", 2**32, r"seed must be an integer in 0..4294967295"),
    ("seed", -1, "seed must be an integer"),
])
def test_config_refuses_out_of_range_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_a_warmup_as_long_as_the_run_is_warned_about(caplog):
    finetune(tiny_llama(), TOK, examples()[:4], None, TrainConfig(steps=2, warmup=20, batch_size=2, precision="fp32"))
    assert "warmup=20 steps is not shorter than the run's 2 steps" in caplog.text


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_grad_accumulation_matches_a_big_batch(task):
    if task == "causal-lm":  # completions of 1 to 29 tokens: micro-batches weigh by their tokens, not equally
        data = [dict(d, completion="ab" * (1 + 7 * (i % 3) ** 2)) for i, d in enumerate(examples()[:8])]
    else:
        data = [{"text": d["prompt"], "label": i % 2} for i, d in enumerate(examples()[:8])]
    results, norms, losses = [], [], []
    for bs, acc in ((8, 1), (4, 2), (2, 4)):
        model = tiny_llama() if task == "causal-lm" else tiny_bert()
        cfg = TrainConfig(task=task, steps=2, batch_size=bs, grad_accum=acc, lr=1e-2, precision="fp32", dropout=0.0,
                          seed=3, max_grad_norm=1e-4)
        result = finetune(model, TOK, data, None, cfg)
        results.append(lorakit.adapter_state_dict(model))
        norms.append([r["grad_norm"] for r in result.history])
        losses.append([r["loss"] for r in result.history])
    for other in results[1:]:
        for k in results[0]:
            torch.testing.assert_close(results[0][k], other[k], atol=1e-6, rtol=1e-4)
    # the logged loss and norm are the whole step's (accumulated) before clipping, as in HF's Trainer
    for n, loss in zip(norms[1:], losses[1:]):
        assert n == pytest.approx(norms[0], rel=1e-4) and loss == pytest.approx(losses[0], rel=1e-5)
    assert min(norms[0]) > 1e-3


def test_resume_equals_uninterrupted(tmp_path):
    full = tiny_llama()
    finetune(full, TOK, examples(), None, config(), out_dir=tmp_path / "a")

    class Stop(Exception):
        pass

    def stop_at_6(event):
        if event["event"] == "step" and event["step"] == 6:
            raise Stop

    with pytest.raises(Stop):
        finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path / "b", callback=stop_at_6)
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-4"
    resumed = tiny_llama()
    result = finetune(resumed, TOK, examples(), None, config(), out_dir=tmp_path / "b", resume=True)
    assert result.steps == 12
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def _stopped_at_step_5(cfg: TrainConfig, out) -> None:
    """A run in `out` interrupted (by an exception from its callback) after step 5, with its checkpoints."""
    with pytest.raises(KeyError):
        finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=out,
                 callback=lambda e: (_ for _ in ()).throw(KeyError) if e.get("step") == 5 else None)


def test_resume_refuses_changed_settings(tmp_path):
    cfg = config()
    _stopped_at_step_5(cfg, tmp_path)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.005 vs now 0.001"):
        finetune(tiny_llama(), TOK, examples(), None, TrainConfig(**{**cfg.to_dict(), "lr": 1e-3}), tmp_path, resume=True)
    for field, value in (("dropout", 0.3), ("max_grad_norm", 0.0), ("use_chat_template", False)):
        with pytest.raises(ValueError, match=rf"{field}: checkpoint .* vs now {value}"):
            finetune(tiny_llama(), TOK, examples(), None, TrainConfig(**{**cfg.to_dict(), field: value}), tmp_path, resume=True)


def test_resume_takes_targets_written_another_way_that_adapt_the_same_layers(tmp_path):
    cfg = dataclasses.replace(config(), target_modules=None)  # the model's default: q_proj, v_proj
    _stopped_at_step_5(cfg, tmp_path)
    same = dataclasses.replace(cfg, target_modules=["q_proj", "v_proj"])
    assert finetune(tiny_llama(), TOK, examples(), None, same, tmp_path, resume=True).steps == cfg.steps
    other = tmp_path / "other"
    _stopped_at_step_5(cfg, other)
    with pytest.raises(ValueError, match=r"target_modules: checkpoint None vs now \['q_proj', 'k_proj', 'v_proj'\]"):
        finetune(tiny_llama(), TOK, examples(), None, dataclasses.replace(cfg, target_modules=["q_proj", "k_proj", "v_proj"]),
                 other, resume=True)


def test_resume_on_a_model_of_another_size_names_the_shapes(tmp_path):
    cfg = config()
    _stopped_at_step_5(cfg, tmp_path)
    files = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"was trained on another model or head \(.*: \(\d+, 32\) there, \(\d+, 16\) here"):
        finetune(other, TOK, examples(), None, cfg, tmp_path, resume=True)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_resume_on_another_base_of_the_same_shape_is_refused(tmp_path):
    cfg = config()
    _stopped_at_step_5(cfg, tmp_path)
    files = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"the base model's weights differ"):
        finetune(tiny_llama(seed=1), TOK, examples(), None, cfg, tmp_path, resume=True)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    result = finetune(tiny_llama(), TOK, examples(), None, cfg, tmp_path, resume=True)  # the same base resumes
    assert result.steps == cfg.steps


def test_resume_on_the_same_model_object_after_a_bf16_run(tmp_path):
    """The run cast the model's base to bf16 itself: resuming with that same object is the same base."""
    cfg = TrainConfig(**{**config().to_dict(), "precision": "bf16"})
    model = tiny_llama()
    with pytest.raises(KeyError):
        finetune(model, TOK, examples(), None, cfg, out_dir=tmp_path,
                 callback=lambda e: (_ for _ in ()).throw(KeyError) if e.get("step") == 5 else None)
    assert finetune(model, TOK, examples(), None, cfg, tmp_path, resume=True).steps == cfg.steps


def test_resume_of_a_checkpoint_with_another_optimizer_layout_is_a_clear_error(tmp_path):
    cfg = TrainConfig(**{**config().to_dict(), "weight_decay": 0.1, "modules_to_save": ["norm"]})
    _stopped_at_step_5(cfg, tmp_path)
    state_file = sorted(tmp_path.glob("checkpoint-*"))[-1] / training.STATE_JSON
    meta = json.loads(state_file.read_text())
    meta["param_groups"] = meta["param_groups"][:1]  # an older lorakit decayed every parameter in one group
    state_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="its optimizer has 1 parameter groups and this run's has 2"):
        finetune(tiny_llama(), TOK, examples(), None, cfg, tmp_path, resume=True)


def test_a_fresh_run_never_overwrites_a_trained_result_in_its_folder(tmp_path):
    lorakit.save_adapter(lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2)), tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"already holds a trained result \(adapter_config.json, adapter_model.safetensors\)"):
        finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


@pytest.mark.parametrize("field, value, message", [
    ("keep_checkpoints", 1.5, "keep_checkpoints must be an integer >= 0 (0: keep every checkpoint)"),
    ("keep_checkpoints", -1, "keep_checkpoints must be an integer >= 0"),
    ("use_chat_template", "no", "use_chat_template must be True, False or None"),
    ("grad_checkpointing", "yes", "grad_checkpointing must be True or False"),
    ("lr", "1e-3", "lr must be a finite number > 0, got '1e-3'"),
    ("epochs", "1", "epochs must be a finite number > 0"),
    ("warmup", True, "warmup must be a finite number >= 0"),
])
def test_train_config_fields_of_the_wrong_type_are_named(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**{field: value})


def test_resume_without_an_output_folder_says_so():
    with pytest.raises(ValueError, match=r"resume=True needs out_dir"):
        finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=None, resume=True)


def test_full_fine_tuning_stores_tied_weights_once_and_reloads_with_safetensors(tmp_path, input_ids):
    from safetensors.torch import load_model

    model = tiny_llama(tie=True)
    finetune(model, TOK, examples(), None, TrainConfig(method="full", steps=2, batch_size=4, precision="fp32"),
             out_dir=tmp_path)
    saved = load_file(tmp_path / training.FULL_MODEL_FILE)
    assert ("lm_head.weight" in saved) != ("model.embed_tokens.weight" in saved)  # one tensor, stored once
    fresh = tiny_llama(tie=True)
    load_model(fresh, tmp_path / training.FULL_MODEL_FILE)  # the reload docs/training.md gives
    torch.testing.assert_close(logits(fresh, input_ids), logits(model, input_ids), atol=0, rtol=0)


def test_lora_plus_ratio_is_refused_for_methods_without_B():
    with pytest.raises(ValueError, match="method 'full' has none"):
        TrainConfig(method="full", lr_ratio_b=16)


def test_an_lr_that_overflows_the_optimizer_step_is_a_clean_stop(tmp_path):
    cfg = dataclasses.replace(config(), lr=1e38, warmup=0.0, max_grad_norm=0.0)
    with pytest.raises(TrainingError, match=r"optimizer step overflowed at step 1 \(lr 1e\+38\).*lower --lr"):
        finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=tmp_path)


def test_sigkill_loses_only_the_steps_since_the_last_checkpoint(tmp_path):
    worker = [sys.executable, str(HERE / "train_worker.py"), str(tmp_path / "run")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(worker + ["--sleep", "0.3"], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "run" / "checkpoint-4").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "worker ended before its first checkpoint"
            time.sleep(0.05)
        time.sleep(0.5)  # let it run past the checkpoint, then kill it hard
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert latest_checkpoint(tmp_path / "run").name in ("checkpoint-4", "checkpoint-8")
    subprocess.run(worker + ["--resume"], env=env, check=True, timeout=120)
    uninterrupted = tiny_llama()
    finetune(uninterrupted, TOK, examples(), None, config(), out_dir=tmp_path / "ref")
    a, b = adapter_tensors(tmp_path / "ref"), adapter_tensors(tmp_path / "run")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_nan_loss_stops_cleanly_with_the_last_checkpoint_intact(tmp_path):
    model = tiny_llama()

    def poison(event):
        if event["event"] == "save":  # after checkpoint-4, break the model
            with torch.no_grad():
                next(iter(lorakit.adapter_parameters(model).values())).fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"loss is nan at step 5.*checkpoint-4"):
        finetune(model, TOK, examples(), None, config(), out_dir=tmp_path, callback=poison)
    good = load_file(str(tmp_path / "checkpoint-4" / "trainer_state.safetensors"))
    assert all(torch.isfinite(t).all() for k, t in good.items() if k.startswith("param."))


def test_full_disk_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = training.atomic_write_bytes
    calls = {"n": 0}

    def write(path, data):
        if Path(path).parent.name.startswith(".checkpoint-8"):
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(training, "atomic_write_bytes", write)
    with pytest.raises(TrainingError, match=r"checkpoint at step 8.*No space left.*checkpoint-4 \(once the cause is fixed.*--resume continues from it\)"):
        finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path)
    assert calls["n"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "metrics.jsonl"]
    monkeypatch.setattr(training, "atomic_write_bytes", real)
    result = finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path, resume=True)
    assert (result.start_step, result.steps) == (4, 12)
    assert [h["step"] for h in result.history] == list(range(5, 13))  # this run's steps: what `seconds` covers


def test_non_finite_gradients_stop_before_the_update_and_nothing_bad_is_saved(tmp_path):
    model = tiny_llama()

    def poison(event):  # after checkpoint-4, make the next backward produce inf gradients
        if event["event"] == "save":
            lorakit.adapter_parameters(model)[next(iter(lorakit.adapter_parameters(model)))].register_hook(
                lambda g: torch.full_like(g, float("inf")))

    with pytest.raises(TrainingError, match=r"gradients are not finite at step 5.*before the update.*checkpoint-4"):
        finetune(model, TOK, examples(), None, config(), out_dir=tmp_path, callback=poison)
    assert all(torch.isfinite(p).all() for p in lorakit.adapter_parameters(model).values())
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"


def test_full_disk_on_metrics_stops_cleanly_and_a_torn_line_does_not_block_resume(tmp_path, monkeypatch):
    real_open = Path.open
    steps = {"n": 0}

    def open_(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode == "a":
            steps["n"] += 1
            if steps["n"] == 6:
                with real_open(self, "a") as f:  # half a record reaches the disk, then it is full
                    f.write('{"step": 6, "loss": 1.2')
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(TrainingError, match=r"metrics.jsonl.*No space left.*checkpoint-4"):
        finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path)
    monkeypatch.undo()
    result = finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path, resume=True)
    assert result.steps == 12
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_full_disk_on_the_loss_plot_is_a_clean_stop(tmp_path, monkeypatch):
    def fail(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, "plot_loss", lambda metrics, png: fail(png, b""))
    with pytest.raises(TrainingError, match="could not write the final result.*the last good checkpoint is .*checkpoint-8 .*--resume continues from it"):
        finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path)
    with pytest.raises(TrainingError, match="could not write the final result.*; no checkpoint was written$"):
        finetune(tiny_llama(), TOK, examples(), None, dataclasses.replace(config(), save_every=0), out_dir=tmp_path / "b")


def test_a_fresh_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    with pytest.raises(KeyError):
        finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path,
                 callback=lambda e: (_ for _ in ()).throw(KeyError) if e.get("step") == 5 else None)
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-4\).*resume"):
        finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path)
    with pytest.raises(ValueError, match="the training data differ"):
        finetune(tiny_llama(), TOK, examples()[:-1], None, config(), out_dir=tmp_path, resume=True)
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"  # both refusals left the run as it was


@pytest.mark.slow
def test_real_smollm2_a_few_steps(tmp_path):
    from lorakit.models import bundled_path, load_model

    try:
        bundled_path("smollm2-135m")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))

    model, tok = load_model("smollm2-135m")
    data = [{"prompt": f"name[Pub {i}], food[Thai]", "completion": f"Pub {i} serves Thai food."} for i in range(16)]
    cfg = TrainConfig(steps=6, lr=2e-3, batch_size=4, max_length=64, target_modules=["q_proj", "v_proj"], eval_every=6)
    before = training.evaluate(model, encode_causal(tok, data, 64), cfg, tok.pad_token_id)["eval_loss"]
    result = finetune(model, tok, data, data, cfg, out_dir=tmp_path)
    assert result.eval_metrics["eval_loss"] < before
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_max_length_beyond_the_position_table_is_cut_to_it(caplog):
    """tiny BERT has 64 positions: a 200-token text with --max-length 1024 trains instead of crashing."""
    data = [{"text": "word " * 200, "label": i % 2} for i in range(4)]
    cfg = TrainConfig(task="classification", steps=1, batch_size=2, max_length=1024, precision="fp32")
    with caplog.at_level("WARNING", logger="lorakit.training"):
        finetune(tiny_bert(num_labels=2), TOK, data, None, cfg)
    assert "max_length=1024 (--max-length) exceeds the model's 64 positions" in caplog.text


def test_binary_classification_eval_reports_matthews_correlation():
    model = tiny_bert(num_labels=2)
    data = [{"text": f"row {i} " + "xyz"[i % 3] * (i % 7 + 1), "label": (i * 5) % 3 % 2} for i in range(16)]
    cfg = TrainConfig(task="classification", batch_size=8, precision="fp32")
    enc = encode_classification(TOK, data, cfg.max_length, 2)

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(**{k: v for k, v in collate(enc[i:i + 8], 0).items() if k != "labels"}).logits
                              for i in range(0, 16, 8)])

    with torch.no_grad():  # move the untrained head's threshold to the median: both classes get predicted
        margin = logits().diff(dim=-1).squeeze(-1)
        model.classifier.bias[1] -= margin.median() + 1e-6
    preds = logits().argmax(-1).tolist()
    labels = [e["label"] for e in data]
    assert 0 < sum(preds) < 16  # both classes predicted: the formula is exercised, not its 0/0 case
    tp = sum(p == y == 1 for p, y in zip(preds, labels))
    tn = sum(p == y == 0 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    denom = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    metrics = evaluate(model, enc, cfg, pad_id=0)
    assert metrics["eval_mcc"] == pytest.approx((tp * tn - fp * fn) / denom if denom else 0.0)
    assert metrics["eval_accuracy"] == pytest.approx((tp + tn) / 16)


def test_raw_records_with_other_field_names_get_the_loaders_message_not_a_key_error(tmp_path):
    rows = [{"question": f"add {i} {i}", "answer": str(2 * i)} for i in range(4)]
    with pytest.raises(ValueError, match=r"train data: example 0 has no field 'prompt' \(it has \['answer', 'question'\]\); "
                                         r"name the prompt field to use: --prompt-field in the CLI, prompt_field= in "
                                         r"lorakit.load_data\(\)"):
        finetune(tiny_llama(), TOK, rows, None, TrainConfig(steps=1, precision="fp32"), out_dir=tmp_path / "a")
    cls = TrainConfig(task="classification", steps=1, precision="fp32")
    with pytest.raises(ValueError, match=r"eval data: example 1 has no field 'label' \(it has \['sentiment', 'text'\]\)"):
        finetune(tiny_bert(num_labels=2), TOK, [{"text": "ok", "label": 1}], [{"text": "a", "label": 0},
                 {"text": "b", "sentiment": 1}], cls, out_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_encoder_is_refused_as_a_causal_lm_and_pointed_to_classification():
    for model in (tiny_bert(), transformers.BertLMHeadModel(tiny_bert().config)):  # the latter: what AutoModelForCausalLM builds
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"is not a causal language model.*--task classification"):
            finetune(model, TOK, examples(), None, TrainConfig(steps=1, precision="fp32"))
        assert lorakit.list_adapters(model) == [] and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    decoder = transformers.BertLMHeadModel(transformers.BertConfig(**{**tiny_bert().config.to_dict(), "is_decoder": True}))
    assert finetune(decoder, TOK, examples(), None, TrainConfig(steps=1, batch_size=4, precision="fp32")).steps == 1


def test_resuming_a_finished_run_says_so_and_keeps_its_result(tmp_path):
    finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert latest_checkpoint(tmp_path).name == "checkpoint-8"
    with pytest.raises(ValueError, match=r"already finished at step 12: nothing to resume"):
        finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"holds a run that finished at step 12: use another output folder"):
        finetune(tiny_llama(), TOK, examples(), None, config(), out_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files


def test_a_finished_run_without_checkpoints_is_not_overwritten(tmp_path):
    finetune(tiny_llama(), TOK, examples(), None, dataclasses.replace(config(), save_every=0), out_dir=tmp_path)
    assert latest_checkpoint(tmp_path) is None
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"holds a run that finished at step 12"):
        finetune(tiny_llama(), TOK, examples(), None, dataclasses.replace(config(), save_every=0), out_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_finetune_refuses_several_active_adapters_before_any_step(tmp_path):
    model = tiny_llama()
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=2), adapter=name)
    lorakit.set_adapter(model, ["a", "b"])
    with pytest.raises(ValueError, match=r"one adapter, but 2 are active \(\['a', 'b'\]\).*set_adapter"):
        finetune(model, TOK, examples(), None, config(), out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_other_tools_checkpoint_folders_and_metrics_are_left_alone(tmp_path, caplog):
    hf = tmp_path / "checkpoint-1"  # Hugging Face's Trainer names its checkpoints the same way
    hf.mkdir()
    (hf / training.STATE_JSON).write_text('{"global_step": 1, "log_history": []}')
    cfg = dataclasses.replace(config(), steps=6, save_every=2, keep_checkpoints=1)
    with pytest.raises(ValueError, match=r"nothing to resume in .*no lorakit checkpoint and no metrics.jsonl"):
        finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=tmp_path, resume=True)
    finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=tmp_path)
    assert hf.is_dir() and latest_checkpoint(tmp_path).name == "checkpoint-4"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("my own notes\n")
    with pytest.raises(ValueError, match=r"already holds a trained result \(metrics.jsonl\)"):
        finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=mine)
    assert (mine / "metrics.jsonl").read_text() == "my own notes\n"


def test_a_checkpoint_write_killed_halfway_leaves_no_temp_folder_after_the_next_save(tmp_path):
    cfg = dataclasses.replace(config(), steps=4, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=tmp_path,
                 callback=lambda e: (_ for _ in ()).throw(KeyboardInterrupt) if e["event"] == "save" else None)
    stale = tmp_path / f".{training.CHECKPOINT_PREFIX}3.tmp"  # what SIGKILL during a save leaves
    stale.mkdir()
    (stale / training.STATE_TENSORS).write_bytes(b"half")
    other = tmp_path / f".{training.CHECKPOINT_PREFIX}notes.tmp"  # not a name lorakit writes
    other.mkdir()
    finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=tmp_path, resume=True)
    assert not stale.exists() and other.is_dir()


def test_a_damaged_checkpoint_is_a_clear_error_on_resume(tmp_path):
    cfg = dataclasses.replace(config(), steps=4, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=tmp_path,
                 callback=lambda e: (_ for _ in ()).throw(KeyboardInterrupt) if e["event"] == "save" else None)
    state = latest_checkpoint(tmp_path) / training.STATE_TENSORS
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"checkpoint-2 is damaged .*delete that folder"):
        finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=tmp_path, resume=True)


class Rows:
    """Like a datasets.Dataset: indexable, iterable, its str() a summary of the columns and row count only."""

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, str]:
        return self.rows[i]

    def __str__(self) -> str:
        return f"Dataset({{features: ['prompt', 'completion'], num_rows: {len(self.rows)}}})"


def _stopped_at_first_save(cfg: TrainConfig, out: Path, train: Rows) -> None:
    """A run on `train` in `out` interrupted right after writing its first checkpoint."""
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_llama(), TOK, train, None, cfg, out_dir=out,
                 callback=lambda e: (_ for _ in ()).throw(KeyboardInterrupt) if e["event"] == "save" else None)


@pytest.mark.parametrize("damage", ["truncated", "not-lorakit", "missing"])
def test_a_damaged_state_json_of_the_newest_checkpoint_is_a_clear_error_not_skipped(tmp_path, damage):
    cfg = dataclasses.replace(config(), save_every=2)
    _stopped_at_step_5(cfg, tmp_path)  # checkpoint-2 and checkpoint-4
    state_file = tmp_path / "checkpoint-4" / training.STATE_JSON
    if damage == "truncated":
        state_file.write_bytes(state_file.read_bytes()[:50])
    elif damage == "not-lorakit":
        state_file.write_text('{"global_step": 4, "log_history": []}')
    else:
        state_file.unlink()
    files = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint-4 is damaged \(.*checkpoint-4/trainer_state.json: "
                                         r".*\); delete that folder to resume from the checkpoint before it"):
        finetune(tiny_llama(), TOK, examples(), None, cfg, tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-4\)"):
        finetune(tiny_llama(), TOK, examples(), None, cfg, tmp_path)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-1")  # an older leftover, damaged too:
    (tmp_path / "checkpoint-1" / training.STATE_JSON).write_text("{")  # not the one a resume takes, so ignored
    shutil.rmtree(tmp_path / "checkpoint-4")  # the fix the message gives
    result = finetune(tiny_llama(), TOK, examples(), None, cfg, tmp_path, resume=True)
    assert (result.start_step, result.steps) == (2, 12)


def test_resume_sees_changed_data_given_as_any_sequence_and_columns_are_refused(tmp_path):
    cfg = dataclasses.replace(config(), steps=4, save_every=2)
    _stopped_at_first_save(cfg, tmp_path, Rows(examples()))
    other = [{"prompt": f"m={i}", "completion": "x"} for i in range(20)]
    with pytest.raises(ValueError, match="the training data differ"):
        finetune(tiny_llama(), TOK, Rows(other), None, cfg, out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="one dict per example"):
        finetune(tiny_llama(), TOK, {"prompt": ["a"], "completion": ["b"]}, None, cfg)


def test_a_checkpoint_of_an_older_lorakit_that_hashed_the_data_argument_itself_resumes(tmp_path):
    """Before the digest was taken over the examples, it was taken over the argument: a Dataset's str() summary."""
    cfg = dataclasses.replace(config(), steps=4, save_every=2)
    _stopped_at_first_save(cfg, tmp_path, Rows(examples()))
    state_file = tmp_path / "checkpoint-2" / training.STATE_JSON
    meta = json.loads(state_file.read_text())
    legacy = hashlib.sha256(json.dumps(Rows(examples()), sort_keys=True, default=str).encode()).hexdigest()
    assert meta["data_sha256"] != legacy
    state_file.write_text(json.dumps({**meta, "data_sha256": legacy}))
    with pytest.raises(ValueError, match="the training data differ"):  # another summary (19 rows) is still refused
        finetune(tiny_llama(), TOK, Rows(examples()[:-1]), None, cfg, out_dir=tmp_path, resume=True)
    result = finetune(tiny_llama(), TOK, Rows(examples()), None, cfg, out_dir=tmp_path, resume=True)
    assert (result.start_step, result.steps) == (2, 4)


def test_classification_max_length_must_leave_room_for_text_and_cut_examples_are_counted(caplog):
    data = [{"text": "a long text " * 5, "label": 0}, {"text": "short", "label": 1}]
    with pytest.raises(ValueError, match=r"max_length=1 .*adds 1 special tokens; raise it to at least 2"):
        encode_classification(TOK, data, 1, 2)
    with caplog.at_level("WARNING", logger="lorakit.data"):
        out = encode_classification(TOK, data, 8, 2)
    assert [len(x["input_ids"]) for x in out] == [8, 6]
    assert "1 of 2 examples are longer than max_length=8" in caplog.text


def test_an_epochs_run_with_grad_accum_sees_each_example_once(monkeypatch):
    seen = []
    original = training._micro_batch

    def recording(data, cfg, index):
        batch = original(data, cfg, index)
        seen.extend(id(x) for x in batch)
        return batch

    monkeypatch.setattr(training, "_micro_batch", recording)
    cfg = dataclasses.replace(config(), steps=None, epochs=1, batch_size=4, grad_accum=3, save_every=0)
    result = finetune(tiny_llama(), TOK, examples(), None, cfg)
    assert result.steps == 2 and len(seen) == len(set(seen)) == 20  # 5 micro-batches: 3, then the 2 left


def test_bias_all_trains_and_saves_the_base_biases_beside_lora(tmp_path, input_ids):
    model = tiny_bert(num_labels=2)
    data = [{"text": ("good fine " if i % 2 else "bad awful ") * 2, "label": i % 2} for i in range(16)]
    cfg = TrainConfig(task="classification", steps=4, lr=1e-2, batch_size=8, precision="fp32", bias="all")
    before = tiny_bert(num_labels=2).bert.encoder.layer[0].output.dense.bias.detach().clone()
    finetune(model, TOK, data, None, cfg, out_dir=tmp_path)
    assert not torch.equal(model.bert.encoder.layer[0].output.dense.bias, before)  # a bias of a layer without LoRA
    fresh = lorakit.load_adapter(tiny_bert(num_labels=2), tmp_path)
    model.eval()
    torch.testing.assert_close(fresh(input_ids).logits, model(input_ids).logits)
    with pytest.raises(ValueError, match="bias='all' .*method 'full'"):
        TrainConfig(method="full", bias="all")


def test_resume_into_a_folder_with_no_run_is_an_error_and_a_run_killed_before_its_first_checkpoint_restarts(tmp_path, caplog):
    cfg = dataclasses.replace(config(), steps=4, save_every=3)
    with pytest.raises(ValueError, match="nothing to resume in .*check the output folder's name"):
        finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=tmp_path / "typo", resume=True)
    assert not (tmp_path / "typo").exists()
    with pytest.raises(KeyboardInterrupt):  # killed at step 2, before the first checkpoint
        finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=tmp_path / "run",
                 callback=lambda e: (_ for _ in ()).throw(KeyboardInterrupt) if e.get("step") == 2 else None)
    assert latest_checkpoint(tmp_path / "run") is None
    with caplog.at_level(logging.WARNING, logger="lorakit.training"):
        result = finetune(tiny_llama(), TOK, examples(), None, cfg, out_dir=tmp_path / "run", resume=True)
    assert result.steps == 4 and "starting from step 0" in caplog.text


def test_a_merged_model_is_refused_before_training_with_the_fix(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, alpha=8))
    lorakit.merge(model)
    with pytest.raises(ValueError, match=r"merged into its base weights.*lorakit.unmerge\(model\) first"):
        finetune(model, TOK, examples(), None, config(), out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists() and lorakit.active_adapters(model) == ["default"]
    lorakit.unmerge(model)
    A0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    finetune(model, TOK, examples(), None, config())
    assert any(not torch.equal(A0[n], p) for n, p in model.named_parameters() if "lora_A" in n)
