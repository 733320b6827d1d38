"""bench/gpu_check.sh: its CPU run passes every step and reports the numbers; the wheel list
follows pyproject.toml and finds the dependencies that only another Python needs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, SRC

STEPS = [
    "prepare", "train_step", "train_step_plain", "pretrain_stop", "pretrain_resume",
    "pretrain_report", "speedrun", "speedrun_report", "sft", "dpo", "generate", "batch_invariance", "serve", "eval_suite",
]  # fmt: skip


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_run_passes_every_step_and_reports_its_numbers(tmp_path, eval_data_dir):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "MINIGPT_EVAL_DATA": str(eval_data_dir)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "every step passed" in done.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and report["failed"] == [] and report["mode"] == "cpu"
    assert {"date", "command", "device", "torch", "python", "total_seconds"} <= set(report)
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    assert all(s["ok"] and s["seconds"] > 0 and s["command"] for s in steps.values())

    train = steps["train_step"]["result"]
    assert [(r["head"], r["micro_batch"]) for r in train] == [("chunked", 2), ("chunked", 4)]
    assert all(r["tokens_per_sec"] > 0 and r["peak_rss_MB"] > 0 for r in train)
    assert steps["train_step_plain"]["result"][0]["head"] == "plain"

    pretrain = steps["pretrain_report"]["result"]
    assert pretrain["failed_checks"] == [] and pretrain["steps"] == 30
    assert pretrain["loss_last"] < pretrain["loss_first"]
    assert {"hellaswag_acc_norm", "tasks_core", "samples"} <= set(pretrain["last_eval"])
    speedrun = steps["speedrun_report"]["result"]  # the Muon recipe
    assert speedrun["failed_checks"] == [] and speedrun["steps"] == 10
    assert speedrun["loss_last"] < speedrun["loss_first"]
    for name in ("sft", "dpo"):
        tuned = steps[name]["result"]
        assert tuned["exit_status"] == 0 and tuned["run"]["failed_checks"] == []
        assert tuned["dynamo"]["frames_compiled"] >= 1

    assert [r["batch"] for r in steps["generate"]["result"]["tokens_per_sec"]] == [1, 2]
    assert steps["batch_invariance"]["result"]["equal"] is True  # float32 on a CPU
    serve = steps["serve"]["result"]["levels"]
    assert [r["clients"] for r in serve] == [1, 2] and all(r["tokens"] > 0 for r in serve)
    assert len(steps["eval_suite"]["result"]["tasks"]) == 13
    assert report["chunked_vs_plain_head"]["micro_batch"] == 4


def test_summary_fails_on_any_failed_step_and_keeps_the_others(tmp_path, capsys):
    gpu_check = load_gpu_check()
    (tmp_path / "steps.tsv").write_text(
        "pretrain_stop\t75\t75\t3.0\tminigpt train ...\n"
        "serve\t1\t0\t2.0\tpython bench/serve_throughput.py\n"
        "eval_suite\t0\t0\t4.5\tminigpt eval suite\n"
    )
    (tmp_path / "eval_suite.json").write_text(
        json.dumps({"tasks": {"copa": {"n": 4}}, "core": 0.5})
    )
    assert gpu_check.main(["summary", str(tmp_path), "--mode", "cpu"]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == ["serve"] and not report["passed"]
    assert [s["ok"] for s in report["steps"]] == [True, False, True]
    assert report["steps"][2]["result"]["core"] == 0.5
    table = capsys.readouterr().out
    assert "FAIL 1" in table and "1 tasks, 4 examples, CORE 0.500" in table


def test_wheels_cover_the_base_dependencies_and_not_torch():
    gpu_check = load_gpu_check()
    names = {r.split(">")[0].split("=")[0].split(";")[0].strip() for r in gpu_check.requirements()}
    assert {"numpy", "tiktoken", "safetensors", "tqdm", "orjson", "tomli"} <= names
    assert {"fastapi", "uvicorn", "chitchat-dataset", "httpx", "pyarrow"} <= names
    assert "torch" not in names


def write_wheel(directory, name: str, version: str, *requires: str) -> None:
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        lines = [f"Name: {name}", *(f"Requires-Dist: {r}" for r in requires)]
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")


def test_fetch_finds_requirements_that_only_another_python_needs(tmp_path):
    gpu_check = load_gpu_check()
    write_wheel(
        tmp_path, "anyio", "4.0.0", "idna>=2.8", 'exceptiongroup>=1.0.2; python_version < "3.11"',
        'trio>=0.26; extra == "trio"',
    )  # fmt: skip
    write_wheel(tmp_path, "idna", "3.10")
    assert gpu_check.missing_requirements(tmp_path, "3.10") == ["exceptiongroup>=1.0.2"]
    assert gpu_check.missing_requirements(tmp_path, "3.12") == []
    assert gpu_check.applies("tomli>=2; python_version < '3.11'", "3.12") is None
    assert gpu_check._wheel_fits("numpy-2.2.6-cp310-cp310-manylinux_2_17_x86_64.whl", "3.10")
    assert not gpu_check._wheel_fits("numpy-2.2.6-cp310-cp310-manylinux_2_17_x86_64.whl", "3.12")
    assert gpu_check._wheel_fits("orjson-3.10-cp38-abi3-manylinux_2_17_x86_64.whl", "3.12")


@pytest.mark.parametrize("args", [[], ["--bogus", "x"]])
def test_usage_errors(args):
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage:" in done.stderr
