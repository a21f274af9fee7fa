"""GSM8K loading: a hub id (e.g. "openai/gsm8k") or a local .jsonl/.json/.parquet file in GSM8K format.

Both paths go through `datasets.load_dataset`, so a local file is read exactly as the hub copy would be.
Every record must have `question` and `answer`, and the answer must end with a `#### N` line (the
GSM8K convention that lm-eval's scoring relies on). Bad input fails early with one message naming the
source and the record index, rather than producing a silently wrong accuracy later.
"""
from __future__ import annotations

import os
import random
import re


LOCAL_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
REQUIRED_FIELDS = ("question", "answer")
# GSM8K's gold line is "#### 72"; we require something non-blank after the marker.
GOLD_LINE = re.compile(r"####[ \t]*\S")


def gold_answer(answer: str) -> str:
    """The number after the last `####`, normalised like lm-eval's gsm8k exact match ignores it:
    `,` and `$` removed, one trailing `.` removed (lm-eval's regexes_to_ignore ",", "\\$", "\\.$")."""
    if "####" not in answer:
        raise ValueError(f"gold answer has no '#### N' line: {answer[-80:]!r}")
    number = answer.split("####")[-1].strip()  # as lm-eval gsm8k_cot's doc_to_target
    number = number.replace(",", "").replace("$", "")
    return re.sub(r"\.$", "", number)


def load_gsm8k(source: str, config_name: str = "main", split: str = "test") -> list[dict]:
    """Load GSM8K records as dicts with `id`, `question`, `answer` (answer = the full worked solution).

    `id` is the record's own `id` field when it has one, else f"{split}-{index:05d}" in file order.
    """
    suffix = os.path.splitext(source)[1].lower()
    if suffix in LOCAL_LOADERS:
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
    for field in REQUIRED_FIELDS:
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise ValueError(f"{source}: record {index} has no {field!r} field (or it is empty)")
    if not GOLD_LINE.search(row["answer"]):
        raise ValueError(f"{source}: record {index}: gold answer has no '#### N' line")
    own_id = row.get("id")
    record_id = str(own_id) if own_id is not None else f"{split}-{index:05d}"
    return {"id": record_id, "question": row["question"], "answer": row["answer"]}


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
