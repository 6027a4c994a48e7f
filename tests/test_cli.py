"""The ``lorakit`` command's face: help, version and subcommand discovery (the demo itself is tested elsewhere)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import build_parser, main
from lorakit.training import lr_schedule


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorakit {lorakit.__version__}"


def test_help_lists_the_discovered_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorakit") and "demo" in out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: lorakit" in capsys.readouterr().out


def test_unknown_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


def test_demo_parser_is_registered_with_a_handler():
    args = build_parser().parse_args(["demo"])
    assert args.command == "demo" and callable(args.func)
    assert args.func.__module__ == "lorakit.cli.demo"


def test_python_dash_m_lorakit_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"lorakit {lorakit.__version__}"


@pytest.mark.parametrize("verbose", [False, True])
def test_cli_logging_shows_lorakit_info_and_hides_other_libraries_info(verbose):
    """Other libraries' INFO lines (matplotlib's "generated new fontManager") stayed in the demo's output."""
    code = (
        "import logging; from lorakit.cli import configure_logging; "
        f"configure_logging({verbose}); "
        "logging.getLogger('lorakit.training').info('ours'); logging.getLogger('matplotlib').info('theirs'); "
        "logging.getLogger('matplotlib').warning('their warning'); logging.getLogger('lorakit').debug('our debug')"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr.split("\n")
    assert "ours" in err and "their warning" in err
    assert ("theirs" in err) is verbose and ("our debug" in err) is verbose


def test_finetune_command_on_a_local_model_folder(tmp_path, capsys):
    """`lorakit finetune` end to end: local model + JSONL, cosine schedule, adapter, metrics and plot written."""
    pytest.importorskip("tokenizers")
    from conftest import char_tokenizer, tiny_llama

    model_dir, out = tmp_path / "model", tmp_path / "run"
    tiny_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"add {i} {i}", "answer": str(2 * i)}) + "\n" for i in range(12)))
    args = ["finetune", "--model", str(model_dir), "--data", str(data), "--prompt-field", "question",
            "--completion-field", "answer", "--steps", "6", "--batch-size", "4", "--lr", "1e-2", "--warmup", "2",
            "--schedule", "cosine", "--precision", "fp32", "--target", "q_proj,v_proj,o_proj", "--out", str(out)]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    expected = [1e-2 * lr_schedule(6, 2, "cosine")(s) for s in range(6)]
    assert lrs == pytest.approx(expected)
    assert (out / "loss.png").stat().st_size > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    with pytest.raises(SystemExit):  # an unknown schedule is argparse's error, before any work
        main(args[:-2] + ["--schedule", "step", "--out", str(tmp_path / "bad")])
    assert "invalid choice: 'step'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def _model_folder(path, model) -> str:
    """Save `model` with the char tokenizer into `path` (a local --model folder)."""
    from conftest import char_tokenizer

    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def test_finetune_seed_covers_the_new_classification_head(tmp_path):
    """The head a headless encoder gets is seeded by --seed: two identical runs start from the same loss."""
    pytest.importorskip("tokenizers")
    import transformers
    from safetensors.torch import load_file

    from conftest import tiny_bert
    from lorakit.models import load_model

    encoder = transformers.BertModel(tiny_bert(num_labels=2).config)  # like minilm-l6: no classification head
    model_dir = _model_folder(tmp_path / "encoder", encoder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "good " * (i % 3 + 1), "label": i % 2}) + "\n" for i in range(8)))
    heads = [load_model(model_dir, "classification", seed=s)[0].classifier.weight for s in (7, 7, 8)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    losses, saved = [], []
    for run in ("a", "b"):
        args = ["finetune", "--model", model_dir, "--data", str(data), "--task", "classification", "--steps", "2",
                "--batch-size", "4", "--precision", "fp32", "--seed", "3", "--out", str(tmp_path / run)]
        assert main(args) == 0
        losses.append([json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()])
        saved.append(load_file(tmp_path / run / "adapter_model.safetensors"))
    assert losses[0] == losses[1]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_finetune_on_a_glue_folder_evaluates_on_its_dev_split_by_default(tmp_path):
    pytest.importorskip("tokenizers")
    from conftest import tiny_bert

    model_dir = _model_folder(tmp_path / "bert", tiny_bert(num_labels=2))
    glue = Path(__file__).parent / "data" / "glue" / "SST-2"
    args = ["finetune", "--model", model_dir, "--data", str(glue), "--task", "classification", "--steps", "2",
            "--batch-size", "4", "--precision", "fp32", "--eval-every", "1", "--target", "query,value"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [1, 2]


def test_finetune_on_glue_records_the_tasks_class_names(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from conftest import tiny_bert

    model_dir = _model_folder(tmp_path / "bert", tiny_bert(num_labels=2))
    rte = Path(__file__).parent / "data" / "glue" / "RTE"
    args = ["finetune", "--model", model_dir, "--data", str(rte), "--task", "classification", "--steps", "1",
            "--batch-size", "2", "--precision", "fp32", "--target", "query,value"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    for run, extra in (("run", []), ("two", ["--num-labels", "2"])):
        if extra:
            assert main([*args, *extra, "--out", str(tmp_path / run)]) == 0
        done = json.loads((tmp_path / run / "run_finished.json").read_text())
        assert done["id2label"] == {"0": "entailment", "1": "not_entailment"}  # was LABEL_0, LABEL_1
    assert main([*args, "--label-names", "a,b,c", "--out", str(tmp_path / "three")]) == 1
    assert "RTE has 2 classes (entailment, not_entailment); labels= gives 3" in capsys.readouterr().err


def test_a_saved_classification_head_keeps_its_size_unless_asked_otherwise(tmp_path, caplog):
    pytest.importorskip("tokenizers")
    from conftest import tiny_bert
    from lorakit.models import load_model

    model_dir = _model_folder(tmp_path / "three", tiny_bert(num_labels=3))
    model = load_model(model_dir, "classification")[0]
    torch.testing.assert_close(model.classifier.weight, tiny_bert(num_labels=3).classifier.weight, rtol=0, atol=0)
    assert "new head" not in caplog.text
    model = load_model(model_dir, "classification", label_names=["neg", "pos"])[0]
    assert model.classifier.out_features == 2 and model.config.id2label == {0: "neg", 1: "pos"}
    assert "has a classification head with 3 classes: a new head with 2 is initialised" in caplog.text
    for kwargs, message in ((dict(num_labels=0), "num_labels must be a positive integer"),
                            (dict(label_names=[]), "label_names is empty")):
        with pytest.raises(ValueError, match=message):
            load_model(model_dir, "classification", **kwargs)
    with pytest.raises(ValueError, match=r"2 label names \['neg', 'pos'\] but num_labels=3"):
        load_model(model_dir, "classification", num_labels=3, label_names=["neg", "pos"])
    (tmp_path / "three" / "tokenizer.json").unlink()
    (tmp_path / "three" / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files .*: save the tokenizer into it"):
        load_model(model_dir, "classification")


def test_finetune_mistyped_model_path_is_one_line_without_a_hub_request(tmp_path, capsys, monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("a path that does not exist must not reach from_pretrained")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    monkeypatch.chdir(tmp_path)
    for name in ("./no-such-dir", str(tmp_path / "no-such-dir"), "runs/models/no-such-dir"):
        assert main(["finetune", "--model", name, "--data", str(data), "--out", str(tmp_path / "run")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"lorakit finetune: error: model {name!r} is not an existing folder")
        assert "smollm2-135m, minilm-l6" in err
    assert not (tmp_path / "run").exists()
    for typo, meant in (("smolm2-135m", "smollm2-135m"), ("MiniLM-L6", "minilm-l6")):
        assert main(["finetune", "--model", typo, "--data", str(data), "--out", str(tmp_path / "run")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"did you mean {meant!r}?" in err


def test_a_hub_id_that_cannot_be_loaded_is_one_clear_error(tmp_path, monkeypatch):
    """Hub ids still go to the hub (one slash at most); a failure there is translated, not a traceback."""
    import transformers

    from conftest import char_tokenizer, tiny_llama
    from lorakit import models
    from lorakit.models import load_model

    asked = []

    def offline(name, *args, **kwargs):
        asked.append((name, kwargs.get("local_files_only", False)))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your internet connection.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    message = (r"model 'someone/no-such-model' is not an existing folder, not a bundled short name \(smollm2-135m, "
               r"minilm-l6\), and not a Hugging Face hub model that could be loaded \(We couldn't connect to "
               r"'https://huggingface.co' to load the files.\)")
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    with pytest.raises(FileNotFoundError, match=message + "$"):
        load_model("someone/no-such-model")
    # no network: straight to the hub's local cache (no ~26 s of retries), and the error says why
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(FileNotFoundError, match=message + r"; the hub cannot be reached from here, so only its local "
                                                          r"cache was read$"):
        load_model("someone/no-such-model")
    assert asked == [("someone/no-such-model", False), ("someone/no-such-model", True)]
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"folder '.*empty' has no config.json: it is not a transformers model"):
        load_model(str(tmp_path / "empty"))
    tiny_llama().config.save_pretrained(tmp_path / "no-weights")
    char_tokenizer().save_pretrained(tmp_path / "no-weights")
    with pytest.raises(FileNotFoundError, match=r"cannot load a model from the folder '.*no-weights': .*no file named"):
        load_model(str(tmp_path / "no-weights"), "causal-lm")


def test_finetune_an_encoder_as_a_causal_lm_points_to_classification(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    import transformers

    from conftest import tiny_bert

    model_dir = _model_folder(tmp_path / "encoder", transformers.BertModel(tiny_bert().config))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    capsys.readouterr()
    assert main(["finetune", "--model", model_dir, "--data", str(data), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit finetune: error: {model_dir!r} is an encoder (bert: it reads the text in both "
                          "directions), not a causal language model: fine-tune it for classification (--task classification")
    assert not (tmp_path / "run").exists()


def test_an_out_folder_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    from lorakit.cli import main

    (tmp_path / "afile").write_text("")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    from conftest import tiny_llama

    model = _model_folder(tmp_path / "model", tiny_llama())
    rc = main(["finetune", "--model", model, "--data", str(data), "--steps", "1", "--out", str(tmp_path / "afile")])
    err = capsys.readouterr().err
    assert rc == 1 and "lorakit finetune: error:" in err and "afile" in err and "Traceback" not in err


@pytest.mark.parametrize("option, value", [("--limit", "-35"), ("--save-every", "-1"), ("--eval-every", "-1"),
                                           ("--warmup", "nan"), ("--eval-limit", "0"), ("-r", "0"), ("--lr", "inf"),
                                           ("--epochs", "inf"), ("--lr-ratio-b", "nan"), ("--dropout", "1.5"),
                                           ("--dropout", "1.0"), ("--lr", "0"), ("--alpha", "0"), ("--epochs", "0"),
                                           ("--lr-ratio-b", "0")])
def test_finetune_refuses_out_of_range_options(option, value, capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--model", "m", "--data", "d.jsonl", "--out", "o", option, value])
    err = capsys.readouterr().err
    assert f"argument {option}: expected" in err
    assert option not in ("--lr", "--alpha", "--epochs", "--lr-ratio-b") or "a finite number > 0" in err


def test_finetune_checks_out_and_eval_split_before_loading_anything(tmp_path, capsys, monkeypatch):
    from lorakit import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded a model")))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    for out, message in (("", "--out is empty"), (str(data), "is a file, not a folder")):
        assert main(["finetune", "--model", "m", "--data", str(data), "--out", out]) == 1
        assert message in capsys.readouterr().err
    assert main(["finetune", "--model", "m", "--data", str(data), "--target", " , ", "--out", str(tmp_path / "o")]) == 1
    assert "--target ' , ' names no module" in capsys.readouterr().err
    assert main(["finetune", "--model", "m", "--data", str(data), "--eval-split", "dev", "--out", str(tmp_path / "o")]) == 1
    assert "a split (split='dev', --eval-split) applies to a GLUE task folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_finetune_ctrl_c_names_the_checkpoint_to_resume_from(tmp_path, capsys, monkeypatch):
    from lorakit import models, training

    def interrupted(model, tokenizer, train, eval_data, cfg, out_dir, resume, callback):
        (Path(out_dir) / "checkpoint-4").mkdir(parents=True)
        (Path(out_dir) / "checkpoint-4" / training.STATE_JSON).write_text('{"step": 4, "config": {}}')
        (Path(out_dir) / "checkpoint-4" / training.STATE_TENSORS).write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(training, "finetune", interrupted)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert main(["finetune", "--model", "m", "--data", str(data), "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 0; the last good checkpoint is" in err and "checkpoint-4" in err and "--resume" in err


def test_hub_reachable_reads_offline_mode_and_dns(monkeypatch):
    import socket

    from lorakit.models import hub_reachable

    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port: [("resolved", host)])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port: (_ for _ in ()).throw(socket.gaierror(-2, "unknown")))
    assert not hub_reachable()


def test_a_local_model_folder_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    from lorakit.models import resolve_model_path

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("m") == resolve_model_path("./m") == str((tmp_path / "m").resolve())
    assert resolve_model_path("org/some-hub-id") == "org/some-hub-id"
