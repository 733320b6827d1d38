"""Question answering with a few given answers, scored as continuations of the question.

Formats are lm-evaluation-harness's (`arc_easy`, `arc_challenge`, `openbookqa`, `sciq`, `piqa`,
`social_iqa`, `commonsense_qa`): the answer text follows "Answer:" (or "A:") after a space, except
CommonsenseQA, whose prompt lists the options and scores the letter. ARC here is the validation
split (published GPT-2 numbers often use test).
"""

from __future__ import annotations

from minigpt.evals.data import Dataset
from minigpt.evals.multiple_choice import BadRow, Example
from minigpt.evals.task import Task


def _lettered(row: dict) -> tuple[list[str], int]:
    """(choice texts, gold index) of a row with `choices: {text, label}` and `answerKey`."""
    texts, labels = row["choices"]["text"], row["choices"]["label"]
    key = str(row["answerKey"]).strip()
    if key not in labels:
        raise BadRow(f"answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return list(texts), labels.index(key)


def arc(row: dict) -> Example:
    choices, gold = _lettered(row)
    return Example.from_choices(
        f"Question: {row['question']}\nAnswer:", choices, gold, row.get("id")
    )


def openbookqa(row: dict) -> Example:
    choices, gold = _lettered(row)
    return Example.from_choices(row["question_stem"], choices, gold, row.get("id"))


def sciq(row: dict) -> Example:
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    context = f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:"
    return Example.from_choices(context, choices, 3)


def piqa(row: dict) -> Example:
    return Example.from_choices(
        f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], _int(row["label"])
    )


def social_iqa(row: dict) -> Example:
    choices = [row["answerA"], row["answerB"], row["answerC"]]
    context = f"Q: {row['context']} {row['question']}\nA:"
    return Example.from_choices(context, choices, _int(row["label"]) - 1)


def commonsense_qa(row: dict) -> Example:
    texts, gold = _lettered(row)
    if len(texts) != 5:
        raise BadRow(f"expected five options, got {len(texts)}")
    options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCDE", texts, strict=True))
    context = f"Question: {row['question'].strip()}{options}\nAnswer:"
    return Example.from_choices(context, list("ABCDE"), gold, row.get("id"))


def _int(value: object) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRow(f"label {value!r} is not an integer")
    return value


TASKS = [
    Task("arc_easy", "ARC-Easy", Dataset("ai2_arc/ARC-Easy/validation", "allenai/ai2_arc",
                                         "ARC-Easy"), arc),
    Task("arc_challenge", "ARC-Challenge", Dataset("ai2_arc/ARC-Challenge/validation",
                                                   "allenai/ai2_arc", "ARC-Challenge"), arc),
    Task("openbookqa", "OpenBookQA", Dataset("openbookqa/main/validation", "allenai/openbookqa",
                                             "main"), openbookqa),
    Task("sciq", "SciQ", Dataset("sciq/none/validation", "allenai/sciq"), sciq),
    Task("piqa", "PIQA", Dataset("piqa/plain_text/validation", "baber/piqa"), piqa),
    Task("social_iqa", "Social IQa", Dataset("social_i_qa/none/validation", "lighteval/siqa"),
         social_iqa, primary="acc"),
    Task("commonsense_qa", "CommonsenseQA", Dataset("tau/commonsense_qa/none/validation",
                                                    "tau/commonsense_qa"), commonsense_qa,
         primary="acc"),
]  # fmt: skip
