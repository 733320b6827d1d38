"""Yes/no and cause/effect questions from SuperGLUE, in lm-evaluation-harness's formats.

BoolQ scores " no" / " yes" after the passage and question. COPA turns the premise into the start
of a sentence ("... because" / "... therefore") and scores each alternative, lower-cased, as its
end; as in lm-eval the choice carries its own leading space after the delimiter's.
"""

from __future__ import annotations

from minigpt.evals.data import Dataset
from minigpt.evals.multiple_choice import BadRow, Example
from minigpt.evals.task import Task


def boolq(row: dict) -> Example:
    answer = row["answer"] if "answer" in row else row["label"]  # hub boolq / super_glue boolq
    if not isinstance(answer, bool | int) or answer not in (0, 1):
        raise BadRow(f"answer {answer!r} is not a boolean")
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return Example.from_choices(context, ["no", "yes"], int(answer), row.get("idx"))


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def copa(row: dict) -> Example:
    connectors = {"cause": "because", "effect": "therefore"}
    if row["question"] not in connectors:
        raise BadRow(f"question {row['question']!r} is neither 'cause' nor 'effect'")
    context = row["premise"].strip()[:-1] + f" {connectors[row['question']]}"
    choices = [" " + _lower_first(row["choice1"]), " " + _lower_first(row["choice2"])]
    return Example.from_choices(context, choices, row["label"], row.get("idx"))


TASKS = [
    Task("boolq", "BoolQ", Dataset("boolq/none/validation", "google/boolq"), boolq,
         primary="acc"),
    Task("copa", "COPA", Dataset("super_glue/copa/validation", "aps/super_glue", "copa"), copa,
         primary="acc"),
]  # fmt: skip
