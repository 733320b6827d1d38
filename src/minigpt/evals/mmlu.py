"""MMLU (Hendrycks et al., 2021): 57 subjects of four-option questions, 0-shot and 5-shot.

lm-evaluation-harness's `mmlu` format: a description naming the subject, then (5-shot) the first
five questions of the subject's dev split with their answer letters, then the question with its
options A-D; the answer letter is scored. Questions come from the test split, as lm-eval does;
the score is the mean over all questions (lm-eval's size-weighted group score).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from minigpt.evals.data import Dataset, EvalDataError, load_rows
from minigpt.evals.multiple_choice import BadRow, Example
from minigpt.evals.task import Loaded, parse_rows

SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology "
    "college_chemistry college_computer_science college_mathematics college_medicine "
    "college_physics computer_security conceptual_physics econometrics electrical_engineering "
    "elementary_mathematics formal_logic global_facts high_school_biology high_school_chemistry "
    "high_school_computer_science high_school_european_history high_school_geography "
    "high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology "
    "high_school_statistics high_school_us_history high_school_world_history human_aging "
    "human_sexuality international_law jurisprudence logical_fallacies machine_learning "
    "management marketing medical_genetics miscellaneous moral_disputes moral_scenarios "
    "nutrition philosophy prehistory professional_accounting professional_law "
    "professional_medicine professional_psychology public_relations security_studies sociology "
    "us_foreign_policy virology world_religions"
).split()
LETTERS = "ABCD"


def dataset(subject: str, split: str) -> Dataset:
    return Dataset(f"hails/mmlu_no_train/{subject}/{split}", "cais/mmlu", subject, split)


def question(row: dict) -> str:
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) != 4:
        raise BadRow(f"expected four choices, got {choices!r}")
    options = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices, strict=True))
    return f"{row['question'].strip()}{options}\nAnswer:"


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def shots_text(shots: list[dict]) -> str:
    return "".join(f"{question(r)} {LETTERS[r['answer']]}\n\n" for r in shots)


@dataclass(frozen=True)
class MMLU:
    """The `Task` interface over 57 subjects; `shots` = 0 or 5."""

    name: str
    title: str
    shots: int
    primary: str = "acc"

    def load(
        self,
        source: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
        limit: int | None = None,
    ) -> Loaded:
        """Test questions of every subject in order (or the rows of a local `source` file in
        the hub schema, with `subject`), the first `limit` in all."""
        if source is not None:
            groups = {}
            rows, where = load_rows(dataset("all", "test"), source, data_dir)
            for row in rows:
                groups.setdefault(
                    row.get("subject", "") if isinstance(row, dict) else "", []
                ).append(row)
        else:
            groups, where = {}, ""
            for subject in SUBJECTS:
                groups[subject], where = load_rows(dataset(subject, "test"), None, data_dir)
            where = where.rsplit(":", 1)[0] + ":mmlu"
        loaded = Loaded([], source=where)
        for subject, rows in groups.items():
            if limit is not None and len(loaded.examples) >= limit:
                break
            prefix = description(subject) + self._shots(subject, source, data_dir)
            part = parse_rows(rows, lambda r, p=prefix: self._format(r, p), where, None, self.name)
            loaded.examples += part.examples
            loaded.skipped += part.skipped
            loaded.problem = loaded.problem or part.problem
        loaded.examples = loaded.examples[:limit]
        return loaded

    def _shots(self, subject: str, source, data_dir) -> str:
        if not self.shots:
            return ""
        if subject not in SUBJECTS:
            raise EvalDataError(f"{self.name}: unknown subject {subject!r}; no dev split for shots")
        rows, _ = load_rows(dataset(subject, "dev"), None, data_dir)
        if len(rows) < self.shots:
            raise EvalDataError(
                f"{self.name}: {subject} has {len(rows)} dev rows, need {self.shots}"
            )
        return shots_text(rows[: self.shots])

    @staticmethod
    def _format(row: dict, prefix: str) -> Example:
        return Example.from_choices(prefix + question(row), list(LETTERS), row["answer"])


TASKS = [MMLU("mmlu", "MMLU (0-shot)", 0), MMLU("mmlu_5shot", "MMLU (5-shot)", 5)]
