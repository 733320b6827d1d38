"""The benchmark tasks by name, in the order tables list them."""

from __future__ import annotations

from minigpt.errors import MinigptError
from minigpt.evals import hellaswag, mmlu, qa, superglue, winogrande

TASKS = {
    task.name: task
    for task in sorted(
        [*hellaswag.TASKS, *qa.TASKS, *winogrande.TASKS, *superglue.TASKS, *mmlu.TASKS],
        key=lambda t: [
            "hellaswag",
            "piqa",
            "arc_easy",
            "arc_challenge",
            "winogrande",
            "openbookqa",
            "boolq",
            "copa",
            "commonsense_qa",
            "sciq",
            "social_iqa",
            "mmlu",
            "mmlu_5shot",
        ].index(t.name),  # fmt: skip
    )
}


def get_task(name: str):
    if name not in TASKS:
        raise MinigptError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def parse_tasks(text: str) -> list[str]:
    """'a,b' -> ['a', 'b'], each checked; 'all' -> every task."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(TASKS)
    for name in names:
        get_task(name)
    if not names:
        raise MinigptError("no tasks given; e.g. --tasks hellaswag,piqa")
    return names
