"""One entry point for problem sets: the embedded synthetic generator or GSM8K (hub id / local file)."""
from __future__ import annotations

SYNTHETIC = "synthetic"


# Independent draws for the stages that read problems, so calibration, profiling and few-shot pools do
# not reuse the same problems (and never the evaluation ones: splits are disjoint).
STREAMS = {"evaluate": 0, "calibration": 1, "profile": 2, "fewshot": 3}


def load_split(dataset: dict, split: str, limit: int | None, seed: int, stream: str = "evaluate") -> list[dict]:
    """Problems of `split` as dicts (id, question, answer); `limit` drawn deterministically by `seed`.

    `dataset` is the config's dataset section: source ("synthetic", a hub id, or a local file), and for
    synthetic the generator's difficulty knobs. For the synthetic source the evaluation set is fixed by
    `synthetic_seed` alone (it is the embedded model's test split); `seed` does not change it.
    """
    if dataset["source"] == SYNTHETIC:
        from .synthetic import SyntheticSpec, generate_problems

        if limit is None:
            raise ValueError("dataset.limit is required for the synthetic source (it sets how many problems to generate)")
        spec = SyntheticSpec(**dataset.get("synthetic", {}))
        return generate_problems(split, limit, dataset.get("synthetic_seed", 0) + STREAMS[stream], spec)
    from .gsm8k import load_gsm8k, subsample

    records = load_gsm8k(dataset["source"], dataset.get("config_name", "main"), split)
    return subsample(records, limit, seed + STREAMS[stream])


def training_text(problem: dict) -> str:
    """The format the embedded model was trained on, used for calibration and profiling passes."""
    return f"Question: {problem['question']}\nAnswer: {problem['answer']}"


# Plain-text calibration sources: a hub data set or a local file whose records have a text field, or a .txt file.
TEXT_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
CALIBRATION_FORMATS = ("problems", "text")


def _load_text_records(source: str, config_name: str | None, split: str, field: str) -> list[str]:
    import os

    suffix = os.path.splitext(source)[1].lower()
    if suffix in TEXT_LOADERS or os.path.isfile(source):
        if suffix not in TEXT_LOADERS:
            raise ValueError(f"{source}: unsupported file type {suffix!r} for text calibration; use one of "
                             f"{sorted(TEXT_LOADERS)}")
        if not os.path.isfile(source):
            raise ValueError(f"{source}: file not found")
        if suffix == ".txt":  # one document: the whole file (datasets' "text" loader would split it by line)
            with open(source, encoding="utf-8") as f:
                return [f.read()]
        import datasets

        try:
            table = datasets.load_dataset(TEXT_LOADERS[suffix], data_files={split: source}, split=split)
        except Exception as err:  # datasets raises several types for unreadable files; one message for all
            raise ValueError(f"{source}: cannot be read as {TEXT_LOADERS[suffix]} records ({err})") from err
    else:
        import datasets

        table = datasets.load_dataset(source, config_name, split=split)
    if field not in table.column_names:
        raise ValueError(f"{source}: records have no {field!r} field (fields: {', '.join(table.column_names)}); "
                         f"set calibration.text_field")
    texts = table[field]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"{source}: record {bad} has a {field!r} that is not a string")
    return texts


def text_chunks(source: str, config_name: str | None, split: str, field: str, tokenizer, n_chunks: int,
                chunk_tokens: int, seed: int, separator: str = "\n\n") -> list[list[int]]:
    """`n_chunks` token-id lists of exactly `chunk_tokens` tokens cut from the text of a data set.

    Documents are shuffled by `seed`, joined with `separator` in that order and tokenized document by
    document until there are enough tokens; the stream is cut into consecutive, non-overlapping chunks
    (a chunk may span documents, as GPTQ's usual wikitext/C4 calibration does). Only as many documents as
    needed are tokenized, so large corpora cost what the samples need. Too little text is an error.
    """
    import random

    texts = _load_text_records(source, config_name, split, field)
    order = list(range(len(texts)))
    random.Random(seed + STREAMS["calibration"]).shuffle(order)
    need = n_chunks * chunk_tokens
    ids: list[int] = []
    for i in order:
        if not texts[i].strip():
            continue  # empty lines of wikitext-style corpora carry no text
        piece = (separator if ids else "") + texts[i]
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"{source}: split {split!r} has {len(ids)} tokens of text in field {field!r}; calibration "
                         f"needs n_samples + n_heldout = {n_chunks} chunks of max_length = {chunk_tokens} tokens "
                         f"({need} tokens)")
    return [ids[c * chunk_tokens:(c + 1) * chunk_tokens] for c in range(n_chunks)]
