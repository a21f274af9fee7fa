"""One entry point for problem sets: the embedded synthetic generator or GSM8K (hub id / local file)."""
from __future__ import annotations

import hashlib
import os

SYNTHETIC = "synthetic"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


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
        problems = generate_problems(split, limit, dataset.get("synthetic_seed", 0) + STREAMS[stream], spec)
        return [{**p, "index": i} for i, p in enumerate(problems)]  # the generator's order is the split's
    from .gsm8k import load_gsm8k, subsample

    records = load_gsm8k(dataset["source"], dataset.get("config_name", "main"), split)
    return subsample(records, limit, seed + STREAMS[stream])


def is_local_file(source: str | None) -> bool:
    """A local data file (one split per file), as opposed to 'synthetic' or a hub id."""
    return bool(source) and source != SYNTHETIC and (os.path.splitext(source)[1].lower() in LOCAL_SUFFIXES
                                                     or os.path.isfile(os.path.expanduser(source)))


def stage_dataset(dataset: dict, section: dict) -> dict:
    """The data set a calibration or profile section reads: its own `source` / `config_name`, else the evaluated
    data set's (whose train split it then takes; refused for a local file by leakage_error)."""
    return {**dataset, "source": section.get("source") or dataset["source"],
            "config_name": section.get("config_name") or dataset.get("config_name", "main")}


def leakage_error(dataset: dict, calibration: dict, profile: dict) -> str | None:
    """Why calibration or profiling would read the evaluated problems, or None.

    A local file holds one split, so 'its train split' is the evaluated file itself: with a local dataset.source,
    calibration.source (problem format) and profile.source must each name another source. The same source and
    split as the evaluation is refused for any source."""
    src, split = dataset["source"], dataset.get("split", "test")
    missing = [f"{name}.source" for name, sec in (("calibration", calibration), ("profile", profile))
               if not sec.get("source") and not (name == "calibration" and sec.get("format") == "text")]
    if is_local_file(src) and missing:
        return (f"dataset.source {src!r} is a local file (one split), so {' and '.join(missing)} cannot fall back to "
                f"its train split; set {' and '.join(missing)} to a train file (e.g. GSM8K's train.jsonl) or a hub id")
    for name, sec in (("calibration", calibration), ("profile", profile)):
        if name == "calibration" and sec.get("format") == "text":
            continue
        same = stage_dataset(dataset, sec)
        same_source = os.path.abspath(os.path.expanduser(same["source"])) == os.path.abspath(os.path.expanduser(src)) \
            if is_local_file(src) else same["source"] == src
        if same_source and (is_local_file(src) or sec.get("split", "train") == split):
            return (f"{name}.source {same['source']!r} (split {sec.get('split', 'train')!r}) is the evaluated data "
                    f"(dataset.source, split {split!r}); set {name}.source/{name}.split to train data")
    return None


def evaluated_problems(dataset: dict, seed: int) -> list[dict]:
    return load_split(dataset, dataset.get("split", "test"), dataset.get("limit"), seed)


def evaluation_split(dataset: dict, seed: int) -> list[dict]:
    """Every problem of the evaluated split, whatever `dataset.limit` subsamples: what the calibrate and profile
    stages check their problems against. Not `limit`'s subsample, so that the evaluation subset stays out of those
    stages' cache keys and a larger limit later cannot reach a problem they used. The synthetic generator has no
    whole split; its splits are disjoint by construction (split_of) and the DAG-time check compares the subsample."""
    if dataset["source"] == SYNTHETIC:
        return []
    return load_split(dataset, dataset.get("split", "test"), None, seed)


def calibration_problems(dataset: dict, calibration: dict, seed: int) -> list[dict]:
    """The calibration problems then the held-out ones (format: problems)."""
    return load_split(stage_dataset(dataset, calibration), calibration.get("split", "train"),
                      calibration["n_samples"] + calibration["n_heldout"], seed, "calibration")


def profile_problems(dataset: dict, profile: dict, seed: int) -> list[dict]:
    return load_split(stage_dataset(dataset, profile), profile.get("split", "train"), profile["n_samples"], seed,
                      "profile")


def question_key(problem: dict) -> str:
    """Content hash of a problem's question, blind to case and whitespace: what 'the same problem' means for the
    disjointness check (ids differ between files; a copy of a test question under another id must still count)."""
    text = " ".join(problem["question"].split()).casefold()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def problems_hash(problems: list[dict]) -> str:
    """Order-free content hash of a problem set (questions and answers), recorded as provenance."""
    keys = sorted(question_key(p) + hashlib.sha256(p["answer"].encode()).hexdigest()[:16] for p in problems)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def texts_hash(items) -> str:
    """Content hash of calibration samples of either format (strings, or token-id lists)."""
    h = hashlib.sha256()
    for item in items:
        h.update((item if isinstance(item, str) else ",".join(map(str, item))).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def assert_disjoint(evaluated: list[dict], others: dict[str, list[dict]]) -> None:
    """Raise ValueError when any problem of `others` (name -> problems) has an evaluated question (question_key)."""
    keys = {question_key(p): p["id"] for p in evaluated}
    for name, problems in others.items():
        hits = [(p["id"], keys[question_key(p)]) for p in problems if question_key(p) in keys]
        if hits:
            shown = ", ".join(f"{a} = evaluated {b}" for a, b in hits[:3])
            raise ValueError(f"{name}: {len(hits)} of its {len(problems)} problems are evaluated problems too "
                             f"({shown}{', ...' if len(hits) > 3 else ''}); use train data that excludes the test set")


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
