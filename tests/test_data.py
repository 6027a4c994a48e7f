"""Data loaders on small files in tests/data, completion-only loss masking, and batching."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.data import (
    GLUE_NAMES,
    IGNORE_INDEX,
    collate,
    default_label_names,
    encode_causal,
    encode_classification,
    encode_prompt,
    format_prompt,
    load_data,
    load_e2e,
    load_glue,
    read_records,
)
from toy_tokenizer import ByteTokenizer

DATA = Path(__file__).parent / "data"


def test_jsonl_with_custom_fields():
    ex = load_data(DATA / "qa.jsonl", "causal-lm", prompt_field="question", completion_field="answer")
    assert ex == [{"prompt": "2+2?", "completion": "4"}, {"prompt": "capital of France?", "completion": "Paris"}]


def test_missing_field_names_the_field_and_the_option():
    with pytest.raises(ValueError, match=r"no field .prompt.*--prompt-field"):
        load_data(DATA / "qa.jsonl", "causal-lm")


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        load_data(DATA / "empty.jsonl", "causal-lm")
    with pytest.raises(ValueError, match="empty"):
        encode_causal(ByteTokenizer(), [], 32)


def test_csv_classification():
    assert load_data(DATA / "reviews.csv", "classification") == [
        {"text": "great movie", "label": 1}, {"text": "awful film", "label": 0}]


def test_label_the_head_cannot_take():
    ex = load_data(DATA / "badlabel.csv", "classification")
    with pytest.raises(ValueError, match=r"labels \[7\] \(e.g. example \d+\) do not fit a head with 2 classes"):
        encode_classification(ByteTokenizer(), ex, 16, num_labels=2)


def test_e2e_csv_keeps_line_breaks_inside_quotes():
    ex = load_e2e(DATA / "e2e.csv")
    assert ex[0] == {"prompt": "name[The Vaults], eatType[pub] ||", "completion": " The Vaults is a pub."}
    assert ex[1]["completion"] == " Alimentum is in the city centre.\r\nIt is nice."
    assert load_data(DATA / "e2e.csv", "causal-lm") == ex  # mr,ref detected


def test_glue_sst2_reads_bare_quotes_as_text():
    ex = load_glue(DATA / "glue" / "SST-2", "train")
    assert len(ex) == 3
    assert ex[2] == {"text": 'the " best " film of the year ', "label": 1}
    assert load_data(DATA / "glue" / "SST-2", "classification", "dev") == load_glue(DATA / "glue" / "SST-2", "dev")
    assert load_data(DATA / "glue" / "SST-2" / "train.tsv", "classification") == ex  # one split's file
    with pytest.raises(ValueError, match=r"one split's file.*--eval-data .*SST-2/dev.tsv"):  # not train.tsv again
        load_data(DATA / "glue" / "SST-2" / "train.tsv", "classification", "dev")


def test_glue_folder_names_are_recognised_in_any_spelling(tmp_path):
    shutil.copytree(DATA / "glue" / "SST-2", tmp_path / "sst2")
    assert load_data(tmp_path / "sst2", "classification") == load_glue(DATA / "glue" / "SST-2")


def test_glue_rte_pairs_and_label_names():
    ex = load_glue(DATA / "glue" / "RTE", "train")
    assert ex[0] == {"text": '"Dana Reeve died.', "text_pair": "Christopher Reeve had an accident.", "label": 1}
    assert ex[1]["label"] == 0


def test_glue_label_names_map_the_tasks_labels_or_rename_its_classes():
    rte = DATA / "glue" / "RTE"
    default = [e["label"] for e in load_data(rte, "classification")]
    swapped = [e["label"] for e in load_data(rte, "classification", labels=["not_entailment", "entailment"])]
    assert swapped == [1 - label for label in default] and default[:2] == [1, 0]  # ids follow the names' order
    sst2 = DATA / "glue" / "SST-2"
    assert load_data(sst2, "classification", labels=["negative", "positive"]) == load_data(sst2, "classification")
    flipped = [e["label"] for e in load_data(sst2, "classification", labels=["positive", "negative"])]
    assert flipped == [1 - e["label"] for e in load_data(sst2, "classification")]  # the task's names reorder, never rename
    with pytest.raises(ValueError, match=r"SST-2 has 2 classes \(negative, positive\); labels= gives 3: "
                                         r"\['neg', 'pos', 'neutral'\]"):
        load_data(sst2, "classification", labels=["neg", "pos", "neutral"])
    assert default_label_names(sst2) == ["negative", "positive"] and default_label_names(rte / "train.tsv") == GLUE_NAMES["RTE"]
    assert default_label_names(DATA / "reviews.csv") is None


def test_class_ids_can_be_named_and_must_fit_the_names(tmp_path):
    (tmp_path / "i.csv").write_text("text,label\nbad,0\ngreat,1\n")
    assert [e["label"] for e in load_data(tmp_path / "i.csv", "classification", labels=["negative", "positive"])] == [0, 1]
    with pytest.raises(ValueError, match=r"example 1 has class id 1, but the class names \['negative'\] name 1 class"):
        load_data(tmp_path / "i.csv", "classification", labels=["negative"])


def test_numeric_class_names_always_map_by_name_whatever_a_file_holds(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,1\nb,3\nc,5\n")
    (tmp_path / "dev.csv").write_text("text,label\na,0\nb,3\n")  # a 0 that is no star rating
    stars = ["1", "2", "3", "4", "5"]
    assert [e["label"] for e in load_data(tmp_path / "train.csv", "classification", labels=stars)] == [0, 2, 4]
    with pytest.raises(ValueError, match=r"example 0 has label '0', which is not one of the class names \['1', '2'"):
        load_data(tmp_path / "dev.csv", "classification", labels=stars)  # never silently id 3 for label "3" here


def test_numeric_class_names_match_labels_written_as_floats_or_padded(tmp_path):
    (tmp_path / "f.jsonl").write_text('{"text": "a", "label": 1.0}\n{"text": "b", "label": 2}\n')
    (tmp_path / "p.csv").write_text('text,label\na," 1"\nb,2\n')
    for file in ("f.jsonl", "p.csv"):
        assert [e["label"] for e in load_data(tmp_path / file, "classification", labels=["1", "2"])] == [0, 1]


def test_glue_cola_has_no_header():
    ex = load_glue(DATA / "glue" / "CoLA", "train")
    assert [e["label"] for e in ex] == [1, 0, 1]
    assert ex[2]["text"] == "Day by day the facts are getting murkier."


def test_glue_test_split_and_wrong_task_are_named(tmp_path):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "test.tsv").write_text("index\tsentence\n0\tBill whistled past the house.\n")
    with pytest.raises(ValueError, match="test splits carry no labels.*dev to evaluate"):
        load_glue(tmp_path / "CoLA", "test")
    with pytest.raises(ValueError, match="--task classification"):
        load_data(DATA / "glue" / "SST-2", "causal-lm")


def test_classification_rows_as_causal_lm_suggest_the_task():
    with pytest.raises(ValueError, match="no field 'prompt'.*--task classification"):
        load_data(DATA / "reviews.csv", "causal-lm")


def test_unknown_format_and_missing_file():
    with pytest.raises(FileNotFoundError):
        read_records(DATA / "nope.jsonl")
    with pytest.raises(ValueError, match="GLUE"):
        load_data(DATA / "glue", "classification")


def test_loss_masks_the_prompt_tokens():
    tok = ByteTokenizer(add_bos=False)
    (enc,) = encode_causal(tok, [{"prompt": "abc", "completion": "xy"}], max_length=64, use_chat_template=False)
    assert enc["input_ids"] == tok.encode("abc") + tok.encode("xy") + [tok.eos_token_id]
    assert enc["labels"] == [IGNORE_INDEX] * 3 + tok.encode("xy") + [tok.eos_token_id]


def test_numbers_in_python_examples_are_read_as_their_text_as_in_a_file():
    tok = ByteTokenizer(add_bos=False)
    assert encode_causal(tok, [{"prompt": 12, "completion": 4.5}], 64, use_chat_template=False) == \
        encode_causal(tok, [{"prompt": "12", "completion": "4.5"}], 64, use_chat_template=False)
    assert encode_classification(tok, [{"text": 7, "text_pair": 8, "label": 1}], 16, num_labels=2) == \
        encode_classification(tok, [{"text": "7", "text_pair": "8", "label": 1}], 16, num_labels=2)


def test_the_prompt_starts_with_bos_where_the_tokenizer_adds_one_as_at_inference():
    """`tokenizer(prompt)` (what generate and `lorakit serve` send) starts with BOS: training sees the same ids."""
    tok = ByteTokenizer()
    (enc,) = encode_causal(tok, [{"prompt": "abc", "completion": "xy"}], max_length=64, use_chat_template=False)
    assert enc["input_ids"] == tok("abc")["input_ids"] + tok.encode("xy") + [tok.eos_token_id]
    assert enc["labels"] == [IGNORE_INDEX] * 4 + tok.encode("xy") + [tok.eos_token_id]
    assert encode_prompt(tok, "abc") == [1, *tok.encode("abc")]


def test_a_chat_template_that_holds_the_bos_gets_no_second_one():
    from conftest import char_tokenizer

    tok = char_tokenizer()  # ids: <s> = 1
    tok._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok("ab")["input_ids"][0] == 1
    assert encode_prompt(tok, "<s>ab") == tok("ab")["input_ids"]  # the text's own <s>, not two
    assert encode_prompt(tok, "ab") == tok("ab")["input_ids"]


def test_chat_template_wraps_the_prompt_only():
    tok = ByteTokenizer(chat_template="toy", add_bos=False)
    prompt = format_prompt(tok, "abc")
    assert prompt == "<user>abc<assistant>"
    (enc,) = encode_causal(tok, [{"prompt": "abc", "completion": "xy"}], max_length=64)
    n = len(tok.encode(prompt))
    assert enc["labels"][:n] == [IGNORE_INDEX] * n and enc["labels"][n:] == tok.encode("xy") + [2]


def test_truncation_keeps_the_completion_and_is_counted(caplog):
    tok = ByteTokenizer(add_bos=False)
    data = [{"prompt": "p" * 50, "completion": "xyz"}, {"prompt": "p", "completion": "x"}]
    enc, short = encode_causal(tok, data, max_length=10, use_chat_template=False)
    assert len(enc["input_ids"]) == 10
    assert enc["labels"][-4:] == tok.encode("xyz") + [2]
    assert len(short["input_ids"]) == 3
    assert "1 of 2 examples are longer than max_length=10" in caplog.text


def test_a_completion_longer_than_max_length_keeps_half_the_room_for_its_prompt(caplog):
    tok = ByteTokenizer(add_bos=False)
    data = [{"prompt": "instruct", "completion": "c" * 50}, {"prompt": "p" * 50, "completion": "c" * 50},
            {"prompt": "ab", "completion": "c" * 50}]
    with caplog.at_level("WARNING", logger="lorakit.data"):
        long_completion, both, short_prompt = encode_causal(tok, data, max_length=12, use_chat_template=False)
    # the prompt's last 6 tokens (the instruction's end, where a chat template puts the assistant header) stay
    assert long_completion["input_ids"][:6] == tok.encode("struct") and long_completion["labels"][:6] == [-100] * 6
    assert long_completion["labels"][6:] == tok.encode("c" * 6) and len(both["input_ids"]) == 12
    assert both["labels"].count(-100) == 6
    assert short_prompt["input_ids"] == tok.encode("ab" + "c" * 10)  # a short prompt leaves the rest to the completion
    assert "3 of 3 examples are longer than max_length=12" in caplog.text
    assert "3 lose the end of their completion" in caplog.text and "2 the start of their prompt" in caplog.text


def test_collate_pads_right_with_mask_and_ignored_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    cls = collate([{"input_ids": [5, 6], "labels": 1}, {"input_ids": [7], "labels": 0}], pad_id=0)
    assert torch.equal(cls["labels"], torch.tensor([1, 0]))


def test_e2e_in_the_lora_papers_txt_format(tmp_path):
    file = tmp_path / "valid.txt"
    file.write_text("name : Alimentum | area : city centre||Alimentum is in the city centre . \n\nname : Aromi||Aromi . \n")
    rows = load_data(file, "causal-lm")
    assert rows == [{"prompt": "name : Alimentum | area : city centre ||", "completion": " Alimentum is in the city centre ."},
                    {"prompt": "name : Aromi ||", "completion": " Aromi ."}]
    (tmp_path / "bad.txt").write_text("no separator here\n")
    with pytest.raises(ValueError, match=r"bad.txt:1 has no '\|\|'"):
        load_data(tmp_path / "bad.txt", "causal-lm")


def test_a_negative_label_is_named_with_its_example_not_a_num_labels_hint(tmp_path):
    file = tmp_path / "neg.jsonl"
    file.write_text('{"text": "fine", "label": 1}\n{"text": "meh", "label": -1}\n')
    with pytest.raises(ValueError, match=r"example 1 has label -1; labels must be class ids: integers >= 0") as err:
        load_data(file, "classification")
    assert "--num-labels" not in str(err.value)
    # examples handed straight to the encoder (the Python API) get the same message, not "--num-labels 0"
    with pytest.raises(ValueError, match=r"train data: example 0 has label -1; labels must be class ids") as err:
        encode_classification(ByteTokenizer(), [{"text": "meh", "label": -1}], 16, num_labels=2, source="train data")
    assert "--num-labels" not in str(err.value)
    with pytest.raises(ValueError, match=r"example 0 has label 1.5; labels must be class ids"):
        encode_classification(ByteTokenizer(), [{"text": "meh", "label": 1.5}], 16, num_labels=2)
    for flag in (True, np.bool_(True), torch.tensor(True)):  # not class 1 (e.g. labels made as scores > 0.5)
        with pytest.raises(ValueError, match=r"example 0 has label .*True.*; labels must be class ids"):
            encode_classification(ByteTokenizer(), [{"text": "meh", "label": flag}], 16, num_labels=2)
    file.write_text('{"text": "fine", "label": true}\n')
    with pytest.raises(ValueError, match=r"example 0 has label True; labels must be class ids"):
        load_data(file, "classification")


def test_a_null_field_is_called_null_not_missing(tmp_path):
    file = tmp_path / "null.jsonl"
    file.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": null}\n')
    with pytest.raises(ValueError, match=r"field 'completion' is null in example 1 \(the completion\)") as err:
        load_data(file, "causal-lm")
    assert "has no field" not in str(err.value)


def test_an_empty_completion_is_an_error_naming_the_example(tmp_path):
    file = tmp_path / "empty.csv"
    file.write_text("prompt,completion\nhello,world\nhi,\n")
    with pytest.raises(ValueError, match=r"field 'completion' is empty in example 1 \(the completion\)"):
        load_data(file, "causal-lm")


def test_no_completion_token_left_after_truncation_is_an_error(caplog):
    tok = ByteTokenizer(add_bos=False)
    data = [{"prompt": "abc", "completion": "xyz"}, {"prompt": "de", "completion": "uvw"}]
    with pytest.raises(ValueError, match=r"no completion tokens survive max_length=1 \(--max-length\) in any of the 2 "
                                         r"examples.*raise it"):
        encode_causal(tok, data, max_length=1, use_chat_template=False)
    # some examples without a token to predict (an empty prompt, one completion token, no EOS): a warning, and
    # they add nothing
    tok.eos_token_id = None
    with caplog.at_level("WARNING", logger="lorakit.data"):
        encode_causal(tok, [*data, {"prompt": "", "completion": "z"}], max_length=8, use_chat_template=False)
    assert "1 of 3 examples have no completion token to predict (e.g. example 2)" in caplog.text


def test_utf8_byte_order_mark_is_read_as_excel_writes_it(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt,completion\r\nhello,\" world\"\r\n")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "hello", "completion": " world"}\n')
    for name in ("bom.csv", "bom.jsonl"):
        assert load_data(tmp_path / name) == [{"prompt": "hello", "completion": " world"}]


def test_a_csv_row_with_more_fields_than_the_header_is_named(tmp_path):
    (tmp_path / "ragged.csv").write_text("prompt,completion\nok,fine\nSay hi:, hello, world\n")
    with pytest.raises(ValueError, match=r"ragged.csv:3 has 3 fields but the header has 2 \(\['prompt', 'completion'\]\); quote"):
        load_data(tmp_path / "ragged.csv")


@pytest.mark.parametrize("line, kind", [("null", "null"), ('"prompt and completion"', "str"), ("[1, 2]", "list")])
def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path, line, kind):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"d.jsonl:2 is a JSON {kind}, not an object"):
        read_records(tmp_path / "d.jsonl")


def test_a_field_holding_a_json_list_or_object_is_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": ["a"], "completion": {"x": 1}}\n')
    with pytest.raises(ValueError, match=r"field 'prompt' of example 0 \(the prompt\) is a JSON list, not text"):
        load_data(tmp_path / "d.jsonl")


def test_string_labels_need_class_names_and_map_through_them(tmp_path):
    (tmp_path / "s.csv").write_text("text,label\nbad,neg\ngreat,pos\nfine,pos\n")
    with pytest.raises(ValueError, match=r"label 'neg': labels are class ids .* --label-names neg,pos .* labels=\[...\]"):
        load_data(tmp_path / "s.csv", "classification")
    assert [e["label"] for e in load_data(tmp_path / "s.csv", "classification", labels=["pos", "neg"])] == [1, 0, 0]
    with pytest.raises(ValueError, match=r"example 1 has label 'pos', which is not one of the class names \['neg', 'bad'\]"):
        load_data(tmp_path / "s.csv", "classification", labels=["neg", "bad"])


def test_tsv_written_by_csv_writer_reads_back_unchanged(tmp_path):
    import csv

    rows = [{"prompt": 'He said "hi"', "completion": "two\nlines"}, {"prompt": "tab\there", "completion": "plain"}]
    with (tmp_path / "d.tsv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "completion"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    assert load_data(tmp_path / "d.tsv") == rows


def test_a_file_that_is_not_utf8_and_json_lines_named_json_are_errors_with_the_fix(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"text,label\ncaf\xe9,1\n")
    with pytest.raises(ValueError, match=r"latin.csv is not UTF-8 text .*save it as UTF-8"):
        read_records(latin)
    lines = tmp_path / "lines.json"
    lines.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    with pytest.raises(ValueError, match=r"lines.json is not valid JSON \(Extra data, line 2\).*name it .jsonl"):
        read_records(lines)


def test_an_e2e_file_of_meaning_representations_only_names_the_files_with_references(tmp_path):
    file = tmp_path / "testset.csv"
    file.write_text('MR\n"name[Blue Spice], eatType[coffee shop]"\n')
    with pytest.raises(ValueError, match=r"E2E meaning representations without references .*testset_w_refs.csv"):
        load_data(file, "causal-lm")
