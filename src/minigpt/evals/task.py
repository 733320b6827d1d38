"""What a benchmark task is: where its rows live, how a row becomes an `Example`, which metric
the suite centres, and loading that counts malformed rows instead of guessing at them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from minigpt.evals.data import Dataset, EvalDataError, load_rows
from minigpt.evals.multiple_choice import BadRow, Example


@dataclass
class Loaded:
    """A task's examples, how many rows were malformed, the first problem, and the source."""

    examples: list[Example]
    skipped: int = 0
    problem: str = ""
    source: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    title: str  # how tables name it
    dataset: Dataset
    format: Callable[[dict], Example]  # raises BadRow (or KeyError/TypeError) on a malformed row
    primary: str = "acc_norm"  # the metric the suite centres and averages; lm-eval's headline one
    notes: str = field(default="", compare=False)

    def load(
        self,
        source: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
        limit: int | None = None,
    ) -> Loaded:
        """The first `limit` examples from `source` (see `data.load_rows` for the order)."""
        rows, where = load_rows(self.dataset, source, data_dir)
        return parse_rows(rows, self.format, where, limit, self.name)


def parse_rows(
    rows: list, format: Callable[[dict], Example], where: str, limit: int | None, name: str
) -> Loaded:
    """Examples of the rows that fit the schema; the others are counted, the first one named."""
    loaded = Loaded([], source=where)
    for number, row in enumerate(rows, 1):
        if limit is not None and len(loaded.examples) >= limit:
            break
        try:
            if not isinstance(row, dict):
                raise BadRow(f"expected an object, got {type(row).__name__}")
            loaded.examples.append(format(row))
        except (BadRow, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            loaded.skipped += 1
            if not loaded.problem:
                reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                loaded.problem = f"{where}: row {number}: {reason}"
    if not loaded.examples:
        raise EvalDataError(
            f"{name}: no usable examples in {where}"
            + (f" ({loaded.skipped} malformed; first: {loaded.problem})" if loaded.skipped else "")
        )
    return loaded
