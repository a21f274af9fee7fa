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
