"""`minigpt plot`: every run given is drawn, under a label that tells it apart."""

from __future__ import annotations

import json

import pytest

from minigpt.train.plot import plot_runs, run_labels


@pytest.mark.parametrize(
    ("dirs", "labels"),
    [
        (["runs/a", "runs/b"], ["a", "b"]),
        (["A/pretrain", "B/pretrain"], ["A/pretrain", "B/pretrain"]),
        (["x/A/pretrain", "y/A/pretrain", "B/pretrain"],
         ["x/A/pretrain", "y/A/pretrain", "B/pretrain"]),
        (["A/pretrain/", "A/pretrain"], ["pretrain", "pretrain (2)"]),  # one folder twice
    ],
)  # fmt: skip
def test_labels_are_the_shortest_distinguishing_suffixes(dirs, labels, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_labels(dirs) == labels


def test_runs_with_the_same_folder_name_are_both_drawn(tmp_path, monkeypatch):
    import matplotlib.figure

    for parent, loss in (("A", 5.0), ("B", 4.0)):
        run = tmp_path / parent / "pretrain"
        run.mkdir(parents=True)
        records = [{"step": 0, "val_loss": loss}, {"step": 5, "train_loss": loss - 1}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    legends = []
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        legends.extend(t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    monkeypatch.chdir(tmp_path)
    plot_runs(["A/pretrain", "B/pretrain"], tmp_path / "plot.png")
    assert legends == ["A/pretrain train", "A/pretrain val", "B/pretrain train", "B/pretrain val"]
