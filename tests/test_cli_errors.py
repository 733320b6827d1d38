"""Every user mistake on a verb that loads a model ends in one line naming it, never a traceback.

The verbs are found by walking the parser (each one with `--model`, and `export`'s MODEL), so a
new verb is walked too; a verb whose required flags are not listed in EXTRA fails here."""

from __future__ import annotations

import argparse
import io
import sys

import pytest
import torch

from minigpt.checkpoints import save_model
from minigpt.cli import build_parser, main
from minigpt.model import GPT
from tests.conftest import tiny_config

# what each verb needs besides its model (OUT is replaced by a path to write)
EXTRA = {
    "generate": ["--prompt", "x"],
    "chat": [],
    "serve": ["--port", "0"],
    "eval loss": ["--data", "OUT"],
    "eval suite": ["--tasks", "piqa"],
    "eval harness": ["--tasks", "copa"],
    "eval reward": ["--data", "OUT"],
    "export hf": ["OUT"],
    "export gguf": ["OUT"],
}


def _model_verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(verb words, takes --device, MODEL positional or not) of every leaf that loads a model."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _model_verbs(sub, (*prefix, name))
    options = {o for a in parser._actions for o in a.option_strings}
    if "--model" in options:
        yield " ".join(prefix), "--device" in options, False
    elif any(a.dest == "checkpoint" for a in parser._actions):
        yield " ".join(prefix), "--device" in options, True


VERBS = sorted(_model_verbs(build_parser()))


def test_the_walk_finds_every_verb_that_loads_a_model():
    names = {verb for verb, _, _ in VERBS}
    assert {"generate", "chat", "serve", "eval loss", "eval hellaswag", "eval piqa",
            "eval suite", "eval harness", "export hf", "export gguf"} <= names  # fmt: skip
    assert "eval compare" not in names  # it reads result files, not a model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_model(root / "ok", GPT(tiny_config()), step=0)
    (root / "empty").mkdir()
    (root / "junk").mkdir()
    (root / "junk" / "notes.txt").write_text("not a model")
    return root


CASES = {
    "cuda": ("ok", ["--device", "cuda"], "CUDA is not available"),
    "unknown device": ("ok", ["--device", "gpu"], "--device='gpu' is not a device; use"),
    "missing model": ("absent", [], "no such file or directory"),
    "empty dir": ("empty", [], "neither a checkpoint directory"),
    "dir of other files": ("junk", [], "neither a checkpoint directory"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("verb", "takes_device", "positional"), VERBS, ids=[v for v, *_ in VERBS])
def test_a_mistake_is_one_line_and_status_2(
    verb, takes_device, positional, case, models, tmp_path, capsys, monkeypatch
):
    model, flags, message = CASES[case]
    if flags and not takes_device:
        pytest.skip(f"{verb} takes no --device")
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    path = str(models / model)
    extra = [str(tmp_path / "out") if a == "OUT" else a for a in EXTRA.get(verb, [])]
    where = [path] if positional else ["--model", path]
    assert main([*verb.split(), *where, *extra, *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"minigpt {verb.split()[0]}: error: ") and message in lines[0]
    assert "Traceback" not in captured.out
