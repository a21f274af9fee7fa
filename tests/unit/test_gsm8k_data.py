"""GSM8K loading from local files (jsonl, json, parquet) and the hub path, errors, gold answers, subsampling."""
from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesweep.data.gsm8k import gold_answer, load_gsm8k, subsample

RECORDS = [
    {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "A house costs $1,000 more than a car costing $2,500. What does the house cost?",
     "answer": "The house costs 2,500 + 1,000 = $3,500.\n#### 3,500"},
    {"question": "The temperature was 3 and fell by 8. What is it now?", "answer": "3 - 8 = -5\n#### -5"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_local_file_formats(tmp_path, suffix):
    path = tmp_path / f"gsm8k{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, RECORDS)
    elif suffix == ".json":
        path.write_text(json.dumps(RECORDS))
    else:
        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    records = load_gsm8k(str(path))
    assert [r["id"] for r in records] == ["test-00000", "test-00001", "test-00002"]
    assert [(r["question"], r["answer"]) for r in records] == [(r["question"], r["answer"]) for r in RECORDS]


def test_ids_follow_split_or_own_id_field(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    assert [r["id"] for r in load_gsm8k(str(path), split="train")][-1] == "train-00002"
    with_ids = [dict(r, id=f"q{i}") for i, r in enumerate(RECORDS)]
    path = write_jsonl(tmp_path / "ids.jsonl", with_ids)
    assert [r["id"] for r in load_gsm8k(str(path))] == ["q0", "q1", "q2"]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([RECORDS[0], {"question": "q?"}], r"bad\.jsonl: record 1 \(id 'test-00001'\) has no 'answer' field"),
        ([{"answer": "#### 1"}], r"bad\.jsonl: record 0 \(id 'test-00000'\) has no 'question' field"),
        ([RECORDS[0], RECORDS[1], {"question": "q?", "answer": "It is 4."}], r"bad\.jsonl: record 2 .*: .*no '#### N' line"),
        ([RECORDS[0], {"question": "q?", "answer": "####  "}], r"bad\.jsonl: record 1 .*: .*no '#### N' line"),
        # issue 22: a non-numeric gold answer is refused naming the record id; an integer answer is named as such
        ([RECORDS[0], {"id": "q7", "question": "q?", "answer": "So many.\n#### seventy-two"}],
         r"bad\.jsonl: record 1 \(id 'q7'\): gold answer '#### seventy-two' is not a number"),
        ([{"id": "q1", "question": "q?", "answer": 72}],
         r"bad\.jsonl: record 0 \(id 'q1'\): 'answer' is a number \(72\), not text"),
        ([dict(RECORDS[0], id="a"), dict(RECORDS[1], id="a")], r"bad\.jsonl: record 1 repeats id 'a' of record 0"),
    ],
)
def test_bad_records(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        load_gsm8k(str(path))


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.jsonl: file not found"):
        load_gsm8k(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: file is empty"):
        load_gsm8k(str(tmp_path / "empty.jsonl"))
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type '\.csv'"):
        load_gsm8k(str(tmp_path / "data.csv"))
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet: cannot be read as parquet records"):
        load_gsm8k(str(tmp_path / "broken.parquet"))


def test_hub_path_calls_load_dataset_with_id_config_split(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_list(RECORDS)  # what the download would have produced

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_gsm8k("openai/gsm8k", "main", "test")
    assert calls == [("openai/gsm8k", "main", "test", {})]
    assert [r["id"] for r in records] == ["test-00000", "test-00001", "test-00002"]
    assert gold_answer(records[1]["answer"]) == "3500"


def test_hub_path_empty_split(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([]))
    with pytest.raises(ValueError, match=r"openai/gsm8k: no records in split 'test'"):
        load_gsm8k("openai/gsm8k")


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("So 72.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### $5.", "5"),
        ("#### -3.5", "-3.5"),
        ("a #### 1\nb #### 2 ", "2"),  # the last marker wins, as lm-eval's split('####')[-1]
    ],
)
def test_gold_answer(answer, expected):
    assert gold_answer(answer) == expected


def test_gold_answer_without_marker():
    with pytest.raises(ValueError, match="no '#### N' line"):
        gold_answer("The answer is 4.")


def test_subsample_is_seeded_and_order_stable():
    records = [{"id": f"test-{i:05d}"} for i in range(50)]
    picked = subsample(records, 10, seed=7)
    assert picked == subsample(records, 10, seed=7)
    assert picked != subsample(records, 10, seed=8)
    positions = [records.index(r) for r in picked]
    assert positions == sorted(positions) and len(set(positions)) == 10
    assert subsample(records, None, seed=7) == records
    assert subsample(records, 50, seed=7) == records
    assert subsample(records, 0, seed=7) == []


def test_subsample_refuses_limit_beyond_data():
    with pytest.raises(ValueError, match="limit 60 is larger than the 50 records"):
        subsample([{"id": str(i)} for i in range(50)], 60, seed=0)


def test_malformed_jsonl_line_is_named_by_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n{\"question\": \"q?\", \n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 4 is not valid JSON"):
        load_gsm8k(str(path))
    path.write_text(json.dumps(RECORDS[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is a JSON list, not an object"):
        load_gsm8k(str(path))


def test_records_carry_their_position_in_the_split(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", RECORDS)
    assert [r["index"] for r in load_gsm8k(str(path))] == [0, 1, 2]
