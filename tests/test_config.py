"""Config files, dotted overrides and their errors, and the resolved-config round trip."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from minigpt.config import (
    ConfigError,
    RunConfig,
    TaskSchedule,
    dump_config,
    load_config,
    parse_override_args,
)
from minigpt.errors import MinigptError

from conftest import REPO, SRC

CONFIGS = REPO / "configs"


def test_gpt2_recipe_matches_the_issue():
    cfg = load_config(CONFIGS / "gpt2-124m-fineweb-edu.toml")
    t = cfg.train
    assert (t.total_batch_tokens, t.sequence_length, t.max_steps) == (524288, 1024, 19073)
    assert (t.max_lr, t.min_lr, t.warmup_steps) == (6e-4, 6e-5, 715)
    assert (t.betas, t.eps, t.weight_decay, t.grad_clip) == ([0.9, 0.95], 1e-8, 0.1, 1.0)
    assert cfg.model.preset == "gpt2"


def test_demo_config_loads_with_every_documented_key():
    cfg = load_config(CONFIGS / "demo-cpu.toml")
    for key in ("max_steps", "micro_batch", "total_batch_tokens", "checkpoint_every"):
        assert isinstance(getattr(cfg.train, key), int)
    assert cfg.data.dir == "runs/demo/data"
    assert cfg.train.device == "cpu"


def test_overrides_with_equals_and_with_space():
    overrides = parse_override_args(
        ["--train.max_steps=20", "--data.dir", "/tmp/x", "--train.max_lr=1e-3"]
    )
    assert overrides == {"train.max_steps": "20", "data.dir": "/tmp/x", "train.max_lr": "1e-3"}
    cfg = load_config(CONFIGS / "demo-cpu.toml", overrides)
    assert (cfg.train.max_steps, cfg.data.dir, cfg.train.max_lr) == (20, "/tmp/x", 1e-3)


def test_override_types_follow_the_schema():
    cfg = load_config(
        None,
        {
            "train.compile": "true",
            "train.warmup_steps": "5",
            "train.min_lr": "0",  # an int is a fine float
            "model.preset": "gpt2-nano",
            "eval.sample_prompts": '["a", "b"]',
            "train.betas": "[0.8, 0.9]",
            "model.n_layer": "3",
        },
    )
    assert cfg.train.compile is True and cfg.train.warmup_steps == 5
    assert cfg.train.min_lr == 0.0 and isinstance(cfg.train.min_lr, float)
    assert cfg.eval.sample_prompts == ["a", "b"] and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.n_layer == 3


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"train.max_step": "5"})
    message = str(err.value)
    assert "train.max_step" in message and "max_steps" in message and "micro_batch" in message
    assert isinstance(err.value, MinigptError)


def test_unknown_section_lists_sections(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[trian]\nmax_steps = 3\n")
    with pytest.raises(ConfigError, match="trian.*valid sections: model, data, train, eval, log"):
        load_config(path)


@pytest.mark.parametrize(
    "key, text",
    [
        ("train.max_steps", "abc"),
        ("train.max_steps", "2.5"),
        ("train.max_steps", "true"),  # a bool is not an int, even though Python says it is
        ("train.compile", "1"),
        ("train.betas", "0.9"),
        ("eval.sample_prompts", "[1, 2]"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(key, text):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, {key: text})


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[train]\nmicro_batch = "sixteen"\n')
    with pytest.raises(ConfigError, match=r"train\.micro_batch must be int"):
        load_config(path)


def test_malformed_override_arguments():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_override_args(["--train.seed"])
    with pytest.raises(ConfigError, match="unrecognized argument"):
        parse_override_args(["--verbose"])


def test_dump_and_load_round_trip(tmp_path):
    cfg = load_config(
        CONFIGS / "gpt2-124m-fineweb-edu.toml",
        {"eval.sample_prompts": '["quote \\" and \\\\ back", "ünïcode\\nline"]'},
    )
    path = tmp_path / "config.toml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert load_config(None) == RunConfig()


def test_task_tables_load_override_round_trip_and_name_bad_keys(tmp_path):
    path = tmp_path / "tasks.toml"
    path.write_text("[eval.task.hellaswag]\nevery = 250\n\n[eval.task.piqa]\nlimit = 9\n")
    cfg = load_config(path, {"eval.task.hellaswag.data": "/data/h s.jsonl",
                             "eval.task.arc_easy.every": "4"})  # fmt: skip
    assert cfg.eval.task == {
        "hellaswag": TaskSchedule(every=250, data="/data/h s.jsonl"),
        "piqa": TaskSchedule(limit=9),
        "arc_easy": TaskSchedule(every=4),
    }
    (tmp_path / "config.toml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "config.toml") == cfg
    with pytest.raises(ConfigError, match=r"eval\.task\.hellaswag\.evry.*every, limit, data"):
        load_config(None, {"eval.task.hellaswag.evry": "2"})
    with pytest.raises(ConfigError, match=r"eval\.task\.hellaswag\.every must be int"):
        load_config(None, {"eval.task.hellaswag.every": "often"})
    with pytest.raises(ConfigError, match=r"eval\.task must be a table"):
        load_config(None, {"eval.task": "3"})


def test_old_hellaswag_keys_map_to_the_hellaswag_task_with_a_warning(tmp_path, monkeypatch):
    path = tmp_path / "old.toml"
    path.write_text("[eval]\nhellaswag_every = 250\nhellaswag_limit = 100\n")
    overrides = {"eval.hellaswag_data": "h.jsonl", "eval.hellaswag_batch_size": "8"}
    with pytest.warns(FutureWarning) as warned:
        old = load_config(path, overrides)
    assert [str(w.message).split(" is deprecated: write ")[1].split()[0] for w in warned] == [
        "eval.task.hellaswag.every", "eval.task.hellaswag.limit", "eval.task.hellaswag.data",
        "eval.task.hellaswag.batch_size",
    ]  # fmt: skip
    new = load_config(None, {"eval.task.hellaswag.every": "250", "eval.task.hellaswag.limit": "100",
                             "eval.task.hellaswag.data": "h.jsonl",
                             "eval.task.hellaswag.batch_size": "8"})  # fmt: skip
    assert old == new and "hellaswag_" not in dump_config(old)
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 says so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(path, overrides) == new


def test_an_old_key_is_warned_about_once(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text("[eval]\nhellaswag_every = 250\n")
    code = (
        "from minigpt.config import load_config\n"
        f"for _ in range(3): load_config({str(path)!r}, {{'eval.hellaswag_every': '5'}})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, check=True)  # fmt: skip
    assert done.stderr.count("FutureWarning") == 1
    assert "eval.hellaswag_every is deprecated: write eval.task.hellaswag.every" in done.stderr


def test_cli_reports_config_errors_without_traceback(cli, tmp_path):
    result = cli("train", CONFIGS / "demo-cpu.toml", "--train.bogus=1", check=False)
    assert result.returncode == 2
    assert "train.bogus" in result.stderr and "Traceback" not in result.stderr
