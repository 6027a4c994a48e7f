"""The demo's generated tasks: held-out records are unseen, and the scores mean what they say."""

from __future__ import annotations

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
