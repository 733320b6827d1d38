"""Winogrande (Sakaguchi et al., 2019): fill the blank with one of two names, by partial scoring.

As in lm-evaluation-harness: each option replaces the blank in the text before it, and the text
after the blank is the one continuation scored in both contexts. The scored text is the same for
both options, so acc_norm equals acc (lm-eval reports acc only).
"""

from __future__ import annotations

from minigpt.evals.data import Dataset
from minigpt.evals.multiple_choice import BadRow, Example
from minigpt.evals.task import Task


def winogrande(row: dict) -> Example:
    sentence = row["sentence"]
    if sentence.count("_") != 1:
        raise BadRow(f"sentence has {sentence.count('_')} blanks, expected one")
    if str(row["answer"]) not in ("1", "2"):
        raise BadRow(f"answer {row['answer']!r} is neither '1' nor '2'")
    blank = sentence.index("_")
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    return Example.from_contexts(contexts, sentence[blank + 1 :].strip(), int(row["answer"]) - 1)


TASKS = [
    Task("winogrande", "Winogrande", Dataset("winogrande/winogrande_xl/validation",
                                             "allenai/winogrande", "winogrande_xl"), winogrande,
         primary="acc"),
]  # fmt: skip
