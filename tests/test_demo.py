"""The demo's generated tasks: held-out records are unseen, and the scores mean what they say."""

from __future__ import annotations

import pytest
import torch

from lorakit.demo import SLOTS, build_task, describe_example, make_records, parse_example, score


def test_held_out_names_never_appear_in_training():
    train = {r["name"] for r in make_records(400, 0, held_out=False)}
    test = {r["name"] for r in make_records(50, 1, held_out=True)}
    assert train and test and not train & test


def test_examples_carry_every_slot():
    rec = make_records(1, 3, held_out=True)[0]
    for make in (describe_example, parse_example):
        ex = make(rec)
        assert all(rec[k] in ex["prompt"] for k in SLOTS)
        assert all(rec[k] in ex["completion"] for k in SLOTS)


def test_score_exact_and_slots():
    task = build_task("describe", describe_example, n_train=4, n_test=2, seed=0)
    right = [ex["completion"] for ex in task.test]
    assert score(right, task) == (1.0, 1.0)
    half = [right[0], "nothing useful"]
    exact, slots = score(half, task)
    assert exact == 0.5 and slots == 0.5


def test_interleaved_latency_pairs_rounds_and_leaves_the_model_merged(monkeypatch):
    """The merged/base ratio is the median of each round's ratio, not a ratio of medians."""
    import lorakit
    from lorakit import demo

    model = lorakit.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), lorakit.LoraConfig(r=2, target_modules=["0"]))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    # the machine slows down round by round; within the rounds merged takes 1.0x, 1.3x, 1.1x the base
    times = iter([1.0, 1.0, 1.2, 2.0, 2.6, 2.4, 4.0, 4.4, 4.8])
    monkeypatch.setattr(demo, "forward_latency", lambda m, ids, repeats: next(times))
    base, merged, unmerged, ratio = demo._interleaved_latency(plain, model, torch.zeros(1, 4), rounds=3)
    assert (base, merged, unmerged) == (2.0, 2.6, 2.4)
    assert abs(ratio - 1.1) < 1e-9  # a ratio of the medians would say 1.3
    assert all(layer.merged_adapters for _, layer in lorakit.state.lora_layers(model))


def test_demo_runs_on_a_tiny_model_and_labels_binary_sizes_mib(tmp_path):
    """Every memory and file size the demo prints is divided by 2**20, so it says MiB, never MB."""
    import re

    pytest.importorskip("tokenizers")
    from conftest import char_tokenizer, tiny_llama
    from lorakit.demo import run_demo

    tiny_llama().save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    lines: list[str] = []
    figures = run_demo(str(tmp_path / "model"), tmp_path / "out", steps=2, n_test=2, emit=lines.append)
    text = "\n".join(lines)
    assert not re.search(r"\bMB\b", text)
    adapter = (tmp_path / "out" / "describe" / "adapter_model.safetensors").stat().st_size / 2**20
    assert f"adapter file: {adapter:.2f} MiB" in text and figures["adapter_mb"] == adapter
    assert re.search(r"peak memory \(measured, process RSS\): [\d,]+ MiB \(before training [\d,]+ MiB", text)
    assert (tmp_path / "out" / "report.md").read_text().startswith(lines[0])
    again = run_demo(str(tmp_path / "model"), tmp_path / "out", steps=2, n_test=2)  # the README's command, re-run
    assert again["adapter_mb"] == figures["adapter_mb"]


def test_demo_refuses_a_folder_with_other_files_before_any_work(tmp_path, capsys):
    from lorakit.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--model", str(tmp_path / "missing-model"), "--out", str(tmp_path)]) == 1
    assert "holds files that are not a lorakit demo's (['notes.txt'])" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: before loading anything
        main(["demo", "--steps", "0", "--out", str(tmp_path / "x")])
    assert "argument --steps: expected an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
