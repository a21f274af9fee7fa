"""GSM8K prompt presets: few-shot exemplars, prompt text, stop sequences and the strict answer regex.

A prompt is rendered the way lm-eval 0.4.13 renders a `generate_until` task (api/task.py
`fewshot_context` + `build_qa_turn`):

    exemplar_1 + fewshot_delimiter + ... + exemplar_n + fewshot_delimiter + question_template(q)
    exemplar = question_template(q_i) + target_delimiter + answer_i

Presets (see PRESETS): `zeroshot`, `lmeval_gsm8k`, `lmeval_gsm8k_fixed`, `lmeval_gsm8k_cot`, `qwen3_4shot_cot`.
`lmeval_gsm8k` draws each question's exemplars as lm-eval does (`exemplars_per_question`); `lmeval_gsm8k_fixed`
is the same prompt with one drawn set for every question.
Chat mode is a flag, not a preset: `build_prompt(..., chat_template=tokenizer)` renders the same turns
through the tokenizer's chat template with Qwen3's thinking disabled.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# lm-eval gsm8k/gsm8k_cot `until` (tasks/gsm8k/gsm8k.yaml, gsm8k-cot.yaml, lm-eval 0.4.13). lm-eval's HF
# backend also appends the tokenizer's EOS text; callers add it when they truncate.
_QUESTION_STOPS = ("Question:", "</s>", "<|im_end|>")
_HASH_REGEX = r"#### (\-?[0-9\.\,]+)"
# Unescaped trailing `.` (any character but newline) as in lm-eval's gsm8k-cot.yaml, so it needs one more
# character after the number: "The answer is 8." gives "8", but "The answer is 8" at the end of the text or
# line gives "[invalid]" and "The answer is 42" gives "4" (tests/unit/test_scoring.py shows lm-eval agrees).
_COT_REGEX = r"The answer is (\-?[0-9\.\,]+)."

# lm-eval 0.4.13 tasks/gsm8k/gsm8k-cot.yaml `fewshot_config.samples` (sampler first_n), which are the
# 8 chain-of-thought exemplars of Wei et al. 2022 (arXiv 2201.11903) in lm-eval's wording. Task data, verbatim.
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
)

# OpenCompass's 4-shot GSM8K CoT prompt (configs/datasets/gsm8k/gsm8k_gen_1d7fe4.py; the same four rounds in
# gsm8k_gen_17d0dc.py): four GSM8K train problems with line-by-line solutions ending "The answer is N".
# Task data, kept verbatim (including the source's typos: "also scores 6 3 pointers").
OPENCOMPASS_4SHOT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "Angelo and Melanie want to plan how many hours over the next week they should study together for their test next week. They have 2 chapters of their textbook to study and 4 worksheets to memorize. They figure out that they should dedicate 3 hours to each chapter of their textbook and 1.5 hours for each worksheet. If they plan to study no more than 4 hours each day, how many days should they plan to study total over the next week if they take a 10-minute break every hour, include 3 10-minute snack breaks each day, and 30 minutes for lunch each day?",
        "Angelo and Melanie think they should dedicate 3 hours to each of the 2 chapters, 3 hours x 2 chapters = 6 hours total.\n"
        "For the worksheets they plan to dedicate 1.5 hours for each worksheet, 1.5 hours x 4 worksheets = 6 hours total.\n"
        "Angelo and Melanie need to start with planning 12 hours to study, at 4 hours a day, 12 / 4 = 3 days.\n"
        "However, they need to include time for breaks and lunch. Every hour they want to include a 10-minute break, so 12 total hours x 10 minutes = 120 extra minutes for breaks.\n"
        "They also want to include 3 10-minute snack breaks, 3 x 10 minutes = 30 minutes.\n"
        "And they want to include 30 minutes for lunch each day, so 120 minutes for breaks + 30 minutes for snack breaks + 30 minutes for lunch = 180 minutes, or 180 / 60 minutes per hour = 3 extra hours.\n"
        "So Angelo and Melanie want to plan 12 hours to study + 3 hours of breaks = 15 hours total.\n"
        "They want to study no more than 4 hours each day, 15 hours / 4 hours each day = 3.75\n"
        "They will need to plan to study 4 days to allow for all the time they need.\n"
        "The answer is 4",
    ),
    (
        "Mark's basketball team scores 25 2 pointers, 8 3 pointers and 10 free throws.  Their opponents score double the 2 pointers but half the 3 pointers and free throws.  What's the total number of points scored by both teams added together?",
        "Mark's team scores 25 2 pointers, meaning they scored 25*2= 50 points in 2 pointers.\n"
        "His team also scores 6 3 pointers, meaning they scored 8*3= 24 points in 3 pointers\n"
        "They scored 10 free throws, and free throws count as one point so they scored 10*1=10 points in free throws.\n"
        "All together his team scored 50+24+10= 84 points\n"
        "Mark's opponents scored double his team's number of 2 pointers, meaning they scored 50*2=100 points in 2 pointers.\n"
        "His opponents scored half his team's number of 3 pointers, meaning they scored 24/2= 12 points in 3 pointers.\n"
        "They also scored half Mark's team's points in free throws, meaning they scored 10/2=5 points in free throws.\n"
        "All together Mark's opponents scored 100+12+5=117 points\n"
        "The total score for the game is both team's scores added together, so it is 84+117=201 points\n"
        "The answer is 201",
    ),
    (
        "Bella has two times as many marbles as frisbees. She also has 20 more frisbees than deck cards. If she buys 2/5 times more of each item, what would be the total number of the items she will have if she currently has 60 marbles?",
        "When Bella buys 2/5 times more marbles, she'll have increased the number of marbles by 2/5*60 = 24\n"
        "The total number of marbles she'll have is 60+24 = 84\n"
        "If Bella currently has 60 marbles, and she has two times as many marbles as frisbees, she has 60/2 = 30 frisbees.\n"
        "If Bella buys 2/5 times more frisbees, she'll have 2/5*30 = 12 more frisbees.\n"
        "The total number of frisbees she'll have will increase to 30+12 = 42\n"
        "Bella also has 20 more frisbees than deck cards, meaning she has 30-20 = 10 deck cards\n"
        "If she buys 2/5 times more deck cards, she'll have 2/5*10 = 4 more deck cards.\n"
        "The total number of deck cards she'll have is 10+4 = 14\n"
        "Together, Bella will have a total of 14+42+84 = 140 items\n"
        "The answer is 140",
    ),
    (
        "A group of 4 fruit baskets contains 9 apples, 15 oranges, and 14 bananas in the first three baskets and 2 less of each fruit in the fourth basket. How many fruits are there?",
        "For the first three baskets, the number of apples and oranges in one basket is 9+15=24\n"
        "In total, together with bananas, the number of fruits in one basket is 24+14=38 for the first three baskets.\n"
        "Since there are three baskets each having 38 fruits, there are 3*38=114 fruits in the first three baskets.\n"
        "The number of apples in the fourth basket is 9-2=7\n"
        "There are also 15-2=13 oranges in the fourth basket\n"
        "The combined number of oranges and apples in the fourth basket is 13+7=20\n"
        "The fourth basket also contains 14-2=12 bananas.\n"
        "In total, the fourth basket has 20+12=32 fruits.\n"
        "The four baskets together have 32+114=146 fruits.\n"
        "The answer is 146",
    ),
)


@dataclass(frozen=True)
class PromptPreset:
    name: str
    n_shots: int
    stop: tuple[str, ...]
    strict_regex: str
    question_template: str  # "{question}" is replaced by the question text
    target_delimiter: str = " "  # between an exemplar's question_template and its answer (lm-eval default)
    fewshot_delimiter: str = "\n\n"  # after each exemplar (lm-eval default)
    # Fixed exemplars (question, answer), used first-n; None = draw n_shots from the train split by seed.
    fixed_exemplars: tuple[tuple[str, str], ...] | None = None
    source: str = ""
    # Drawn presets only: True = a fresh set per question from one Random(1234) stream over the whole train split,
    # in test-split order (lm-eval's default sampler); False = one set drawn by the config seed for every question.
    per_question: bool = False

    def render_question(self, question: str) -> str:
        # str.replace, not str.format: questions may contain braces.
        return self.question_template.replace("{question}", question)


PRESETS: dict[str, PromptPreset] = {
    preset.name: preset
    for preset in (
        PromptPreset(
            name="zeroshot",
            n_shots=0,
            stop=_QUESTION_STOPS,
            strict_regex=_HASH_REGEX,
            question_template="Question: {question}\nAnswer:",
            source="lm-eval gsm8k prompt with no exemplars; the embedded tiny model was trained on this "
            "format and answers with a worked solution ending '#### N'.",
        ),
        PromptPreset(
            name="lmeval_gsm8k",
            n_shots=5,
            stop=_QUESTION_STOPS,
            strict_regex=_HASH_REGEX,
            question_template="Question: {question}\nAnswer:",
            per_question=True,
            source="lm-eval 0.4.13 task gsm8k (tasks/gsm8k/gsm8k.yaml): 5 exemplars per question drawn from the "
            "whole train split by one random.Random(1234) stream in test-split order (its default sampler and "
            "fewshot seed), exemplar answer = full solution with '#### N'.",
        ),
        PromptPreset(
            name="lmeval_gsm8k_fixed",
            n_shots=5,
            stop=_QUESTION_STOPS,
            strict_regex=_HASH_REGEX,
            question_template="Question: {question}\nAnswer:",
            source="lm-eval gsm8k's prompt with ONE exemplar set for every question, drawn by the config seed from "
            "dataset.fewshot_pool train problems (not lm-eval's protocol: every prompt shares its prefix).",
        ),
        PromptPreset(
            name="lmeval_gsm8k_cot",
            n_shots=8,
            stop=("Q:", "</s>", "<|im_end|>"),
            strict_regex=_COT_REGEX,
            question_template="Q: {question}\nA:",
            fixed_exemplars=GSM8K_COT_EXEMPLARS,
            source="lm-eval 0.4.13 task gsm8k_cot (tasks/gsm8k/gsm8k-cot.yaml): the 8 fixed CoT exemplars "
            "of Wei et al. 2022, first-n.",
        ),
        PromptPreset(
            # The Qwen3 report says only "GSM8K (4-shot, CoT)" for base models and publishes no prompt.
            # ASSUMPTION: the OpenCompass 4-shot CoT prompt, the most widely used public 4-shot GSM8K CoT
            # prompt, rendered as OpenCompass renders rounds for a base model without a meta template
            # (rounds joined with "\n"; each answer there ends in "\n", so exemplars are separated by a
            # blank line). Stops as lm-eval's gsm8k (OpenCompass cuts at "Question" and scores the last
            # number, i.e. close to our flexible-extract).
            name="qwen3_4shot_cot",
            n_shots=4,
            stop=_QUESTION_STOPS,
            strict_regex=r"The answer is (\-?[0-9\.\,]+)",  # no trailing '.': these exemplars end without one
            question_template="Question: {question}\nLet's think step by step\nAnswer:",
            target_delimiter="\n",
            fixed_exemplars=OPENCOMPASS_4SHOT_EXEMPLARS,
            source="Qwen3 report 'GSM8K (4-shot, CoT)'; prompt ASSUMED to be OpenCompass "
            "configs/datasets/gsm8k/gsm8k_gen_1d7fe4.py (Qwen's own base-model prompt is unpublished).",
        ),
    )
}


def get_preset(name: str) -> PromptPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown prompt preset {name!r}; allowed: {', '.join(sorted(PRESETS))}") from None


def select_fewshot(preset: PromptPreset, train_records: list[dict], seed: int) -> list[dict]:
    """The exemplars (dicts with `question`, `answer`) for `preset`.

    Fixed-exemplar presets ignore `train_records` and `seed`. Otherwise `n_shots` records are drawn with
    `random.Random(seed).sample`, in drawn order, which is what lm-eval's default ContextSampler does
    (api/samplers.py). lm-eval draws a fresh set per test question from one stream seeded once (1234);
    with seed=1234 this returns lm-eval's set for the first question. Callers wanting per-question sets
    pass a per-question seed; one set for the whole run keeps every prompt's prefix identical.
    """
    if preset.fixed_exemplars is not None:
        return [{"id": f"{preset.name}-{i}", "question": q, "answer": a}
                for i, (q, a) in enumerate(preset.fixed_exemplars[: preset.n_shots])]
    if preset.n_shots == 0:
        return []
    if len(train_records) < preset.n_shots:
        raise ValueError(
            f"preset {preset.name!r} needs {preset.n_shots} exemplars but only {len(train_records)} "
            "train records were given"
        )
    return [_exemplar(r) for r in random.Random(seed).sample(train_records, preset.n_shots)]


def _exemplar(record: dict) -> dict:
    return {"id": record.get("id"), "question": record["question"], "answer": record["answer"]}


def lmeval_fewshot_sets(preset: PromptPreset, train_records: list[dict], n_questions: int, seed: int = 1234) -> list[list[dict]]:
    """One exemplar set per test question, drawn exactly as lm-eval 0.4.13 does in one process: a single
    Random(seed) stream (default fewshot seed 1234), one `sample(train, n_shots)` per question in order."""
    if preset.fixed_exemplars is not None or preset.n_shots == 0:
        return [select_fewshot(preset, train_records, seed) for _ in range(n_questions)]
    select_fewshot(preset, train_records, seed)  # same size check and message
    stream = random.Random(seed)
    return [[_exemplar(r) for r in stream.sample(train_records, preset.n_shots)] for _ in range(n_questions)]


LMEVAL_FEWSHOT_SEED = 1234  # lm-eval's default --seed for few-shot sampling (the fourth of "0,1234,1234,1234")


def exemplars_per_question(preset: PromptPreset, pool: list[dict], positions: list[int], seed: int) -> list[list[dict]]:
    """Each evaluated question's exemplars. `positions` are the questions' indices in their split (lm-eval's doc
    order: its stream advances once per question, so question j gets the j-th draw whether or not the questions
    before it are evaluated). Per-question presets draw as lm-eval does; the others use one set (select_fewshot)."""
    if preset.per_question and preset.fixed_exemplars is None and preset.n_shots:
        sets = lmeval_fewshot_sets(preset, pool, max(positions) + 1 if positions else 0, LMEVAL_FEWSHOT_SEED)
        return [sets[j] for j in positions]
    one = select_fewshot(preset, pool, seed)
    return [one for _ in positions]


def build_prompt(
    preset: PromptPreset,
    question: str,
    fewshot: list[dict],
    chat_template=None,
    fewshot_as_multiturn: bool = True,
) -> str:
    """The prompt text for one test question.

    Plain mode: the exemplars and question as one string (lm-eval's rendering, see module docstring).
    Chat mode (`chat_template` = a tokenizer with `apply_chat_template`): as lm-eval 0.4.13's
    `--apply_chat_template`, which turns on fewshot_as_multiturn by default: each exemplar becomes a
    user turn (its question_template) and an assistant turn (its answer), then the test question as a
    user turn; rendered with add_generation_prompt=True and enable_thinking=False (Qwen3 instruct
    checkpoints, thinking off). fewshot_as_multiturn=False puts the whole plain prompt in one user turn.
    """
    if len(fewshot) != preset.n_shots:
        raise ValueError(f"preset {preset.name!r} takes {preset.n_shots} exemplars, got {len(fewshot)}")
    if chat_template is None or not fewshot_as_multiturn:
        parts = [
            preset.render_question(ex["question"]) + preset.target_delimiter + ex["answer"] + preset.fewshot_delimiter
            for ex in fewshot
        ]
        text = "".join(parts) + preset.render_question(question)
        if chat_template is None:
            return text
        messages = [{"role": "user", "content": text}]
    else:
        messages = []
        for ex in fewshot:
            messages.append({"role": "user", "content": preset.render_question(ex["question"])})
            messages.append({"role": "assistant", "content": ex["answer"]})
        messages.append({"role": "user", "content": preset.render_question(question)})
    return chat_template.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def truncate_at_stop(completion: str, stop: tuple[str, ...]) -> str:
    """Cut `completion` at the earliest stop sequence, as lm-eval's postprocess_generated_text
    (models/utils.py: `generation.split(term)[0]` for each non-empty term)."""
    for term in stop:
        if term:
            completion = completion.split(term)[0]
    return completion
