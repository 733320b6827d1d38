"""`minigpt eval suite` end to end on a tiny model: the table, the JSON, the CORE mean, compare;
`minigpt eval TASK`; the benchmark tasks during training."""

from __future__ import annotations

import json

import pytest
import torch

from minigpt.checkpoints import save_model
from minigpt.errors import MinigptError
from minigpt.evals import multiple_choice
from minigpt.evals.suite import centered, compare_table, markdown_table, percent
from minigpt.evals.tasks import get_task
from minigpt.model import GPT

from conftest import tiny_config

TASKS = "hellaswag,winogrande,copa"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_model(directory / f"m{seed}", GPT(tiny_config()), step=0)
    return directory


def test_suite_table_json_core_and_compare(checkpoints, eval_data_dir, tmp_path, cli):
    env = {"MINIGPT_EVAL_DATA": str(eval_data_dir)}
    outputs = []
    for seed in (0, 1):
        out = tmp_path / f"m{seed}.json"
        result = cli(
            "eval", "suite", "--model", checkpoints / f"m{seed}", "--tasks", TASKS,
            "--limit", "8", "--output", out, "--no-progress", env=env,
        )  # fmt: skip
        outputs.append((out, result.stdout))
    data = json.loads(outputs[0][0].read_text())
    assert list(data["tasks"]) == TASKS.split(",") and data["limit"] == 8
    # each task's numbers equal scoring that task's first 8 examples directly
    model = GPT(tiny_config())
    model.load_state_dict(_weights(checkpoints / "m0"))
    centred = []
    for name in TASKS.split(","):
        task = get_task(name)
        examples = task.load(data_dir=eval_data_dir, limit=8).examples
        predictions = multiple_choice.predict(model, examples, "cpu")
        expected = multiple_choice.summarize(multiple_choice.tally(predictions, examples), 1)
        got = data["tasks"][name]
        for metric in ("acc", "acc_norm", "acc_per_token", "random", "n"):
            assert got[metric] == pytest.approx(expected[metric]), (name, metric)
        assert got["centered"] == pytest.approx(centered(got[task.primary], got["random"]))
        centred.append(got["centered"])
    assert data["core"] == pytest.approx(sum(centred) / 3)
    table = outputs[0][1]
    assert table == markdown_table(data) + "\n"
    assert "| HellaSwag | 8 |" in table and f"**{percent(data['core'])}**" in table
    compared = cli("eval", "compare", outputs[0][0], outputs[1][0]).stdout
    other = json.loads(outputs[1][0].read_text())
    assert compared == compare_table({"m0": data, "m1": other}) + "\n"
    hella = f"| HellaSwag | acc_norm | {percent(data['tasks']['hellaswag']['acc_norm'])} | "
    assert hella in compared
    assert (
        f"| **CORE** | centred | **{100 * data['core']:.1f}** | **{100 * other['core']:.1f}** |"
        in compared
    )


def _weights(checkpoint):
    from minigpt.checkpoints import load_model

    return load_model(checkpoint).state_dict()


def test_single_task_cli_and_bad_inputs(checkpoints, eval_data_dir, tmp_path, cli):
    env = {"MINIGPT_EVAL_DATA": str(eval_data_dir)}
    result = cli("eval", "piqa", "--model", checkpoints / "m0", "--limit", "4", env=env)
    assert "piqa acc " in result.stdout and "n 4" in result.stdout
    assert "offline:piqa/plain_text/validation" in result.stdout
    bad = cli("eval", "suite", "--model", checkpoints / "m0", "--tasks", "piqa,nope",
              check=False, env=env)  # fmt: skip
    assert bad.returncode == 2 and "unknown task 'nope'" in bad.stderr
    missing = cli("eval", "compare", tmp_path / "absent.json", check=False)
    assert missing.returncode == 2 and "no such results file" in missing.stderr


def test_tasks_hook_logs_each_task(eval_data_dir, monkeypatch):
    from minigpt.config import EvalSection
    from minigpt.train.pretrain import tasks_hook

    monkeypatch.setenv("MINIGPT_EVAL_DATA", str(eval_data_dir))
    section = EvalSection(tasks=["copa", "arc_easy"], tasks_every=5, tasks_limit=6)
    hook = tasks_hook(section)
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    logged = hook.fn(5, model)
    assert hook.every == 5 and set(logged) == {
        "copa_acc", "copa_acc_norm", "arc_easy_acc", "arc_easy_acc_norm", "tasks_core"
    }  # fmt: skip
    expected = []
    for name in ("copa", "arc_easy"):
        task = get_task(name)
        examples = task.load(data_dir=eval_data_dir, limit=6).examples
        result = multiple_choice.evaluate(model, examples, "cpu")
        assert logged[f"{name}_acc"] == result["acc"]
        expected.append(centered(result[task.primary], result["random"]))
    assert logged["tasks_core"] == pytest.approx(sum(expected) / 2)


def test_one_tasks_hook_keeps_each_tasks_cadence_and_core(eval_data_dir, tmp_path, monkeypatch):
    """HellaSwag on its own schedule ([eval.task.hellaswag], as the old eval.hellaswag_* keys
    map) beside eval.tasks: each is scored at its own steps, every one at the last step, and
    tasks_core averages eval.tasks alone."""
    from test_hellaswag import official_rows, write_jsonl

    from minigpt.config import EvalSection, TaskSchedule
    from minigpt.evals import hellaswag
    from minigpt.train.pretrain import tasks_hook

    monkeypatch.setenv("MINIGPT_EVAL_DATA", str(eval_data_dir))
    data = tmp_path / "hellaswag_val.jsonl"
    write_jsonl(data, official_rows(8))
    schedule = TaskSchedule(every=2, limit=5, data=str(data), batch_size=2)
    section = EvalSection(task={"hellaswag": schedule}, tasks=["copa"], tasks_every=3,
                          tasks_limit=4)  # fmt: skip
    hook = tasks_hook(section, max_steps=7)
    assert hook.every == 1  # the trainer calls it at every step either cadence may fall on
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    logged = {step: hook.fn(step, model) for step in range(8)}
    hella = ["hellaswag_acc", "hellaswag_acc_norm"]
    copa = ["copa_acc", "copa_acc_norm", "tasks_core"]
    assert {step: list(m) for step, m in logged.items()} == {
        0: hella + copa, 1: [], 2: hella, 3: copa, 4: hella, 5: [], 6: hella + copa, 7: hella + copa
    }  # fmt: skip
    alone = hellaswag.evaluate(model, hellaswag.load_examples(data, limit=5), "cpu")
    assert logged[2]["hellaswag_acc_norm"] == alone["acc_norm"]
    copa_task = get_task("copa")
    result = multiple_choice.evaluate(model, copa_task.load(limit=4).examples, "cpu")
    assert logged[3]["tasks_core"] == centered(result[copa_task.primary], result["random"])
    assert tasks_hook(EvalSection(task={"hellaswag": TaskSchedule(every=0)})) is None
    with pytest.raises(MinigptError, match="eval.task.nope: unknown task 'nope'"):
        tasks_hook(EvalSection(task={"nope": TaskSchedule(every=1)}))


def test_plot_draws_task_scores(tmp_path):
    from minigpt.train.plot import plot_runs, score_names

    records = [
        {"step": 0, "val_loss": 5.0, "hellaswag_acc_norm": 0.25, "piqa_acc_norm": 0.5},
        {"step": 5, "train_loss": 4.0, "lr": 1e-3},
        {"step": 10, "val_loss": 4.5, "piqa_acc": 0.55, "piqa_acc_norm": 0.6, "tasks_core": 0.1},
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert score_names(records) == ["hellaswag_acc_norm", "piqa_acc_norm", "tasks_core"]
    out = plot_runs([run], tmp_path / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_percent_never_prints_negative_zero():
    assert (percent(-0.0004), percent(0.3051), percent(-0.12)) == ("0.0", "30.5", "-12.0")


def test_cli_lists_every_task():
    from minigpt.cli.evaluate import TASK_NAMES
    from minigpt.evals.tasks import TASKS

    assert TASK_NAMES == list(TASKS)
