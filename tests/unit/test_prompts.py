"""Prompt presets: exact prompt text, exemplars, stops, chat mode and truncation.

The lm-eval presets were checked once against lm-eval 0.4.13 itself (scratch venv): its
ConfigurableTask built from tasks/gsm8k/gsm8k.yaml and gsm8k-cot.yaml on a local gsm8k-format file gave
byte-identical `fewshot_context` strings for the first question (fewshot seed 1234), and identical chat
messages with fewshot_as_multiturn True and False. `test_matches_lm_eval_live` repeats this whenever
`lm_eval` is importable.
"""
from __future__ import annotations

import json
import random

import pytest

from moesweep.data.prompts import (
    PRESETS,
    build_prompt,
    get_preset,
    lmeval_fewshot_sets,
    select_fewshot,
    truncate_at_stop,
)
from moesweep.scoring import extract_strict


def train_records(n=12):
    return [
        {"id": f"train-{i:05d}", "question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
        for i in range(n)
    ]


def test_get_preset_and_unknown_name():
    assert set(PRESETS) == {"zeroshot", "lmeval_gsm8k", "lmeval_gsm8k_fixed", "lmeval_gsm8k_cot", "qwen3_4shot_cot"}
    assert get_preset("lmeval_gsm8k").n_shots == 5
    with pytest.raises(ValueError, match="unknown prompt preset 'gsm8k'.*lmeval_gsm8k, lmeval_gsm8k_cot, lmeval_gsm8k_fixed"):
        get_preset("gsm8k")


def test_zeroshot_prompt():
    preset = get_preset("zeroshot")
    assert select_fewshot(preset, train_records(), seed=0) == []
    assert build_prompt(preset, "How many?", []) == "Question: How many?\nAnswer:"
    assert preset.stop == ("Question:", "</s>", "<|im_end|>")
    assert preset.strict_regex == r"#### (\-?[0-9\.\,]+)"


def test_lmeval_gsm8k_prompt_text_and_sampling():
    preset = get_preset("lmeval_gsm8k")
    train = train_records()
    fewshot = select_fewshot(preset, train, seed=1234)
    drawn = random.Random(1234).sample(train, 5)  # lm-eval's ContextSampler: rnd.sample(docs, n)
    assert [ex["question"] for ex in fewshot] == [r["question"] for r in drawn]
    assert select_fewshot(preset, train, seed=1234) == fewshot
    assert select_fewshot(preset, train, seed=1) != fewshot

    prompt = build_prompt(preset, "Tom has {3} apples?", fewshot)
    expected = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in drawn)
    assert prompt == expected + "Question: Tom has {3} apples?\nAnswer:"  # braces survive
    assert preset.stop == ("Question:", "</s>", "<|im_end|>")


def test_lmeval_fewshot_sets_is_one_stream():
    preset = get_preset("lmeval_gsm8k")
    train = train_records()
    sets = lmeval_fewshot_sets(preset, train, n_questions=3, seed=1234)
    stream = random.Random(1234)
    for one_set in sets:
        assert [ex["question"] for ex in one_set] == [r["question"] for r in stream.sample(train, 5)]
    assert sets[0] == select_fewshot(preset, train, seed=1234)


def test_lmeval_gsm8k_cot_prompt_text():
    preset = get_preset("lmeval_gsm8k_cot")
    fewshot = select_fewshot(preset, [], seed=0)  # fixed exemplars: no train split needed
    assert len(fewshot) == 8
    prompt = build_prompt(preset, "How many?", fewshot)
    assert prompt.startswith(
        "Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
        "done, there will be 21 trees. How many trees did the grove workers plant today?\n"
        "A: There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
        "have been 21 - 15 = 6. The answer is 6.\n\n"
        "Q: If there are 3 cars in the parking lot"
    )
    assert prompt.endswith("The answer is 8.\n\nQ: How many?\nA:")
    assert prompt.count("\n\nQ: ") == 8
    assert preset.stop == ("Q:", "</s>", "<|im_end|>")
    answers = [extract_strict(ex["answer"], preset.strict_regex) for ex in fewshot]
    assert answers == ["6", "5", "39", "8", "9", "29", "33", "8"]


def test_qwen3_4shot_cot_prompt_text():
    preset = get_preset("qwen3_4shot_cot")
    fewshot = select_fewshot(preset, [], seed=0)
    prompt = build_prompt(preset, "How many?", fewshot)
    # OpenCompass base-model rendering: rounds joined by "\n", each solution ends with "\n".
    assert prompt.startswith(
        "Question: Angelo and Melanie want to plan how many hours over the next week"
    )
    assert "each day?\nLet's think step by step\nAnswer:\nAngelo and Melanie think" in prompt
    assert "The answer is 4\n\nQuestion: Mark's basketball team" in prompt
    assert prompt.endswith("The answer is 146\n\nQuestion: How many?\nLet's think step by step\nAnswer:")
    assert [extract_strict(ex["answer"], preset.strict_regex) for ex in fewshot] == ["4", "201", "140", "146"]


def test_wrong_exemplar_count_and_small_train_split():
    preset = get_preset("lmeval_gsm8k")
    with pytest.raises(ValueError, match="takes 5 exemplars, got 2"):
        build_prompt(preset, "q", train_records(2))
    with pytest.raises(ValueError, match="needs 5 exemplars but only 3 train records"):
        select_fewshot(preset, train_records(3), seed=0)


class RecordingTokenizer:
    def apply_chat_template(self, messages, **kwargs):
        self.messages, self.kwargs = messages, kwargs
        return "rendered"


def test_chat_mode_multiturn_like_lm_eval():
    preset = get_preset("lmeval_gsm8k_cot")
    fewshot = select_fewshot(preset, [], seed=0)
    tok = RecordingTokenizer()
    assert build_prompt(preset, "How many?", fewshot, chat_template=tok) == "rendered"
    assert tok.kwargs == {"tokenize": False, "add_generation_prompt": True, "enable_thinking": False}
    assert len(tok.messages) == 17
    assert tok.messages[0] == {"role": "user", "content": f"Q: {fewshot[0]['question']}\nA:"}
    assert tok.messages[1] == {"role": "assistant", "content": fewshot[0]["answer"]}
    assert tok.messages[-1] == {"role": "user", "content": "Q: How many?\nA:"}


def test_chat_mode_single_turn():
    preset = get_preset("lmeval_gsm8k")
    fewshot = select_fewshot(preset, train_records(), seed=3)
    tok = RecordingTokenizer()
    build_prompt(preset, "How many?", fewshot, chat_template=tok, fewshot_as_multiturn=False)
    assert tok.messages == [{"role": "user", "content": build_prompt(preset, "How many?", fewshot)}]


def test_chat_mode_with_a_real_template_disables_thinking():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]"
    )
    # The part of Qwen3's template that matters here: enable_thinking=False pre-fills an empty think block.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    )
    prompt = build_prompt(get_preset("zeroshot"), "How many?", [], chat_template=tok)
    assert prompt == (
        "<|im_start|>user\nQuestion: How many?\nAnswer:<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


@pytest.mark.parametrize(
    "completion, expected",
    [
        (" 6 + 1 = 7\n#### 7\n\nQuestion: next one", " 6 + 1 = 7\n#### 7\n\n"),
        ("answer</s>Question: x", "answer"),  # earliest stop wins, whatever its place in the tuple
        ("no stop here", "no stop here"),
        ("Question: at the start", ""),
    ],
)
def test_truncate_at_stop(completion, expected):
    assert truncate_at_stop(completion, ("Question:", "</s>", "<|im_end|>")) == expected


def test_truncate_ignores_empty_stop():
    assert truncate_at_stop("abc", ("", "c")) == "ab"


def test_matches_lm_eval_live(tmp_path):
    """Our prompts and presets against lm-eval's own yaml files and prompt builder, when installed."""
    lm_eval = pytest.importorskip("lm_eval")
    import os

    import yaml
    from lm_eval.api.task import ConfigurableTask

    train, test = train_records(), [{"question": "Sam has {2} cats. How many?", "answer": "2\n#### 2"}]
    for split, rows in (("train", train), ("test", test)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k")
    for yaml_name, preset_name in (("gsm8k.yaml", "lmeval_gsm8k"), ("gsm8k-cot.yaml", "lmeval_gsm8k_cot")):
        config = yaml.safe_load(open(os.path.join(tasks_dir, yaml_name)))
        preset = get_preset(preset_name)
        assert config["num_fewshot"] == preset.n_shots
        assert tuple(config["generation_kwargs"]["until"]) == preset.stop
        assert config["filter_list"][0]["filter"][0]["regex_pattern"] == preset.strict_regex
        config.update(
            dataset_path="json",
            dataset_name=None,
            dataset_kwargs={"data_files": {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "test")}},
        )
        task = ConfigurableTask(config=config)
        task.set_fewshot_seed(1234)
        theirs = task.fewshot_context(task.test_docs()[0], num_fewshot=preset.n_shots)
        ours = build_prompt(preset, test[0]["question"], select_fewshot(preset, train, seed=1234))
        assert ours == theirs, yaml_name


def test_per_question_exemplars_match_lm_eval_byte_for_byte(tmp_path):
    """lmeval_gsm8k as the evaluate stage renders it (exemplars_per_question over the whole train file, questions
    at their test-split positions, a subsample included) against lm-eval's own task built from its gsm8k.yaml on
    the same real-format files: every question's prompt identical, byte for byte."""
    lm_eval = pytest.importorskip("lm_eval")
    import os

    import yaml
    from lm_eval.api.task import ConfigurableTask

    from moesweep.data.gsm8k import load_gsm8k, subsample
    from moesweep.data.prompts import exemplars_per_question
    from moesweep.data.synthetic import generate_problems

    for split, n in (("train", 40), ("test", 12)):
        rows = [{"question": p["question"], "answer": p["answer"]} for p in generate_problems(split, n, 3)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = yaml.safe_load(open(os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", "gsm8k.yaml")))
    config.update(dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "test")}})
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(1234)
    # lm-eval renders the questions in split order, one draw per question from its seeded stream
    theirs = [task.fewshot_context(doc, num_fewshot=5) for doc in task.test_docs()]

    preset = get_preset("lmeval_gsm8k")
    train = load_gsm8k(str(tmp_path / "train.jsonl"), split="train")
    test = load_gsm8k(str(tmp_path / "test.jsonl"))
    for problems in (test, subsample(test, 5, seed=9)):  # a subsample keeps each question's own draw
        shots = exemplars_per_question(preset, train, [p["index"] for p in problems], seed=0)
        ours = [build_prompt(preset, p["question"], s) for p, s in zip(problems, shots)]
        assert ours == [theirs[p["index"]] for p in problems]
    assert len(set(theirs)) == len(theirs)
