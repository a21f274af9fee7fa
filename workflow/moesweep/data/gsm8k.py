"""GSM8K loading: a hub id (e.g. "openai/gsm8k") or a local .jsonl/.json/.parquet file in GSM8K format.

A hub id and local .json/.parquet files go through `datasets.load_dataset`; a local .jsonl file is read
line by line here, so a malformed line is reported with its line number (datasets' JSON reader names none)
and a column of mixed types cannot fail inside Arrow. Every record must have `question` and `answer`
strings, and the answer must end with a `#### N` line whose N is a number (the GSM8K convention that
lm-eval's scoring relies on). Bad input fails early with one message naming the source and the record,
rather than producing a silently wrong accuracy later.
"""
from __future__ import annotations

import json
import os
import random
import re


LOCAL_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
REQUIRED_FIELDS = ("question", "answer")
# GSM8K's gold line is "#### 72"; we require something non-blank after the marker.
GOLD_LINE = re.compile(r"####[ \t]*\S")
# What gold_answer must leave for lm-eval's exact match to be meaningful: a number ("72", "-5", "3.5").
GOLD_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


def gold_answer(answer: str) -> str:
    """The number after the last `####`, normalised like lm-eval's gsm8k exact match ignores it:
    `,` and `$` removed, one trailing `.` removed (lm-eval's regexes_to_ignore ",", "\\$", "\\.$")."""
    if "####" not in answer:
        raise ValueError(f"gold answer has no '#### N' line: {answer[-80:]!r}")
    number = answer.split("####")[-1].strip()  # as lm-eval gsm8k_cot's doc_to_target
    number = number.replace(",", "").replace("$", "")
    return re.sub(r"\.$", "", number)


def load_gsm8k(source: str, config_name: str = "main", split: str = "test") -> list[dict]:
    """Load GSM8K records as dicts with `id`, `index`, `question`, `answer` (answer = the full worked solution).

    `id` is the record's own `id` field when it has one, else f"{split}-{index:05d}" in file order; `index`
    is the record's position in the split (lm-eval's doc_id: its few-shot draws follow this order).
    """
    suffix = os.path.splitext(source)[1].lower()
    if suffix == ".jsonl":
        table = _read_jsonl(source)
    elif suffix in LOCAL_LOADERS:
        table = _load_local(source, suffix, split)
    elif os.path.isfile(source):
        raise ValueError(f"{source}: unsupported file type {suffix!r}; use one of {sorted(LOCAL_LOADERS)}")
    else:
        import datasets  # here, not at module level: evaluation on the synthetic set must not need it

        table = datasets.load_dataset(source, config_name, split=split)
    if len(table) == 0:
        raise ValueError(f"{source}: no records in split {split!r}")
    records = [_checked_record(source, split, index, row) for index, row in enumerate(table)]
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if record["id"] in seen:
            raise ValueError(f"{source}: record {index} repeats id {record['id']!r} of record {seen[record['id']]}")
        seen[record["id"]] = index
    return records


def _read_jsonl(path: str) -> list[dict]:
    """Records of a JSON-lines file; blank lines are skipped, anything else must be one JSON object."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: file is empty")
    rows = []
    with open(path, encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object with "
                                     f"'question' and 'answer'")
                rows.append(row)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start} of a line)") from None
    return rows


def _load_local(path: str, suffix: str, split: str):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: file is empty")
    # data_files keyed by `split` so the split name (and so the default ids) match the hub layout.
    try:
        import datasets

        return datasets.load_dataset(LOCAL_LOADERS[suffix], data_files={split: path}, split=split)
    except Exception as err:  # datasets raises several types for unreadable files; one message for all
        raise ValueError(f"{path}: cannot be read as {LOCAL_LOADERS[suffix]} records ({err})") from err


def _checked_record(source: str, split: str, index: int, row: dict) -> dict:
    own_id = row.get("id")
    record_id = str(own_id) if own_id is not None else f"{split}-{index:05d}"
    where = f"{source}: record {index} (id {record_id!r})"
    for field in REQUIRED_FIELDS:
        value = row.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # Reported for what it is: a bare number is not GSM8K's worked solution ending in '#### N'.
            raise ValueError(f"{where}: {field!r} is a number ({value!r}), not text; GSM8K's {field} is a string"
                             + (" ending in a '#### N' line" if field == "answer" else ""))
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where} has no {field!r} field (or it is empty)")
    if not GOLD_LINE.search(row["answer"]):
        raise ValueError(f"{where}: gold answer has no '#### N' line")
    gold = gold_answer(row["answer"])
    if not GOLD_NUMBER.fullmatch(gold):
        raise ValueError(f"{where}: gold answer '#### {row['answer'].split('####')[-1].strip()}' is not a number; "
                         f"allowed: digits with an optional '-', '.', ',' or '$' (e.g. '#### 72')")
    return {"id": record_id, "index": index, "question": row["question"], "answer": row["answer"]}


def subsample(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    """`limit` records chosen by `random.Random(seed)`, kept in their original order.

    A limit larger than the data set is refused rather than silently evaluating fewer questions:
    the accuracy's confidence interval (and any comparison with other runs) depends on n.
    """
    if limit is None:
        return list(records)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit > len(records):
        raise ValueError(f"limit {limit} is larger than the {len(records)} records available")
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in chosen]
