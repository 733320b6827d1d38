"""The lm-evaluation-harness bridge: lm-eval's own task definitions through `MinigptLM` give what
lm-eval's built-in `hf` model gives on the exported HF directory, and what `minigpt eval` gives;
all from local rows, with the hub switched off."""

from __future__ import annotations

import json

import pytest
import torch

from minigpt.evals import multiple_choice
from minigpt.evals.tasks import get_task
from minigpt.model import GPT, GPT2_VOCAB_SIZE

from conftest import tiny_config

lm_eval = pytest.importorskip("lm_eval")
ROWS = 24
TASKS = ("hellaswag", "piqa", "arc_easy")


@pytest.fixture(scope="module")
def local_rows(eval_data_dir, tmp_path_factory):
    """The first rows of each task's offline split, as JSONL files in the hub schema."""
    from minigpt.evals.data import find_offline_store

    store = find_offline_store(eval_data_dir)
    directory = tmp_path_factory.mktemp("rows")
    files = {}
    for name in TASKS:
        rows = store.rows(get_task(name).dataset.offline)[:ROWS]
        files[name] = directory / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


@pytest.fixture(scope="module")
def model_and_hf_dir(tmp_path_factory):
    """A tiny minigpt model and its HF export, cut to GPT-2's 50,257 text tokens: the bridge
    normalises over those (as OpenAI's gpt2 does), the export adds three chat tokens."""
    from safetensors.torch import load_file, save_file

    from minigpt.interop.hf import export_hf

    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=256)).eval()  # room for PIQA's longest answers
    directory = tmp_path_factory.mktemp("hf")
    export_hf(model, directory)
    weights = load_file(str(directory / "model.safetensors"))
    weights["transformer.wte.weight"] = weights["transformer.wte.weight"][:GPT2_VOCAB_SIZE].clone()
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "vocab_size": GPT2_VOCAB_SIZE}))
    return model, directory


def scores(result: dict) -> dict:
    return {
        name: (r["acc,none"], r["acc_norm,none"])
        for name, r in result["results"].items()
        if name in TASKS
    }


def test_bridge_equals_lm_evals_hf_model_and_minigpt_eval(
    local_rows, model_and_hf_dir, monkeypatch
):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from minigpt.evals.harness import MinigptLM, offline_task_config

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")  # lm-eval must not touch the hub
    model, hf_dir = model_and_hf_dir
    manager = TaskManager()
    specs = [offline_task_config(n, {"eval": local_rows[n]}, manager) for n in TASKS]
    ours = lm_eval.simple_evaluate(
        model=MinigptLM(model, "cpu", batch_size=8), tasks=specs, task_manager=manager
    )
    hf = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(hf_dir), device="cpu", batch_size=8),
        tasks=[offline_task_config(n, {"eval": local_rows[n]}, manager) for n in TASKS],
        task_manager=manager,
    )
    assert scores(ours) == scores(hf)
    assert set(scores(ours)) == set(TASKS)
    for name in TASKS:
        examples = get_task(name).load(local_rows[name]).examples
        summary = multiple_choice.summarize(
            multiple_choice.tally(multiple_choice.predict(model, examples, "cpu"), examples), 1
        )
        assert (summary["acc"], summary["acc_norm"]) == pytest.approx(scores(ours)[name]), name


def test_rolling_and_generation_requests(model_and_hf_dir):
    from lm_eval.api.instance import Instance

    from minigpt.engine import Engine, Sampling
    from minigpt.evals.harness import MinigptLM
    from minigpt.tokenizer import get_tokenizer

    model, _ = model_and_hf_dir
    lm = MinigptLM(model, "cpu")
    text = "To be, or not to be, that is the question. " * 50  # longer than the context of 256
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    (total,) = lm.loglikelihood_rolling([request])
    tokens = [50256, *get_tokenizer().encode(text)]
    expected = 0.0
    with torch.no_grad():  # disjoint runs of <= 256 predictions, each after the 256 tokens before
        for start in range(1, len(tokens), 256):
            end = min(len(tokens), start + 256)
            window = torch.tensor([tokens[max(0, end - 257) : end]])
            logp = torch.log_softmax(model(window[:, :-1])[0][0, :, :GPT2_VOCAB_SIZE], -1)
            picked = logp[torch.arange(window.size(1) - 1), window[0, 1:]]
            expected += picked[-(end - start) :].sum().item()
    assert total == pytest.approx(expected, abs=1e-3)
    tok = get_tokenizer()
    with torch.no_grad():  # the model's own favourite next token makes one greedy pair
        best = model(torch.tensor([tok.encode("The cat")]))[0][0, -1, :GPT2_VOCAB_SIZE].argmax()
    favourite = tok.decode([int(best)])
    assert tok.encode("The cat" + favourite)[2:] == [int(best)]  # round-trips, as it should
    pairs = [("The cat", " sat"), ("The cat", " sat on the mat"), ("Hello ", "world"),
             ("The cat", favourite)]  # fmt: skip
    scored = lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs])
    for (context, continuation), (ll, greedy) in zip(pairs, scored, strict=True):
        context, continuation = (
            context.rstrip(),
            continuation if context == context.rstrip() else " " + continuation,
        )
        ctx = get_tokenizer().encode(context)
        tokens = get_tokenizer().encode(context + continuation)
        with torch.no_grad():
            logp = torch.log_softmax(
                model(torch.tensor([tokens[:-1]]))[0][0, :, :GPT2_VOCAB_SIZE], -1
            )
        rows = torch.arange(len(ctx) - 1, len(tokens) - 1)
        targets = torch.tensor(tokens[len(ctx) :])
        assert ll == pytest.approx(logp[rows, targets].sum().item(), abs=1e-4)
        assert greedy == bool((logp[rows].argmax(-1) == targets).all())
    assert scored[-1][1] is True
    gen = Instance("generate_until", {}, ("Hello", {"until": ["\n"], "max_gen_toks": 8}), 0)
    (out,) = lm.generate_until([gen])
    ids = Engine(model, GPT2_VOCAB_SIZE).generate(
        [get_tokenizer().encode("Hello")], 8, Sampling(temperature=0), stop_ids={50256}
    )[0]
    assert out == get_tokenizer().decode([t for t in ids if t != 50256]).split("\n")[0]


def test_cli_harness_reads_the_offline_copy(model_and_hf_dir, eval_data_dir, tmp_path, cli):
    from minigpt.checkpoints import save_model

    model, _ = model_and_hf_dir
    save_model(tmp_path / "ckpt", model, step=0)
    out = tmp_path / "lm-eval.json"
    env = {"MINIGPT_EVAL_DATA": str(eval_data_dir), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    cli("eval", "harness", "--model", tmp_path / "ckpt", "--tasks", "copa", "--limit", "12",
        "--output", out, env=env)  # fmt: skip
    harness = json.loads(out.read_text())["copa"]["acc,none"]
    examples = get_task("copa").load(data_dir=eval_data_dir, limit=12).examples
    predictions = multiple_choice.predict(model, examples, "cpu")
    assert harness == pytest.approx(sum(p.pred == p.gold for p in predictions) / 12)


def test_every_task_the_bridge_reads_offline_scores_as_minigpt_eval(
    model_and_hf_dir, eval_data_dir, tmp_path, cli
):
    """`eval harness` (lm-eval's task configs over the offline rows) and the suite (our own
    tasks, as `eval suite` runs them) on the same first rows of every task both offer: a field the bridge maps wrongly
    (BoolQ's `answer`, read as lm-eval's `label`) shows as a different score, not a silent 0."""
    from minigpt.checkpoints import save_model
    from minigpt.evals.harness import OFFLINE_TASKS
    from minigpt.evals.suite import run_suite
    from minigpt.evals.tasks import TASKS as SUITE

    model, _ = model_and_hf_dir
    save_model(tmp_path / "ckpt", model, step=0)
    tasks = ",".join(t for t in OFFLINE_TASKS if t in SUITE)
    assert len(tasks.split(",")) == len(OFFLINE_TASKS)
    env = {"MINIGPT_EVAL_DATA": str(eval_data_dir), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    common = ["--model", tmp_path / "ckpt", "--tasks", tasks, "--limit", str(ROWS)]
    cli("eval", "harness", *common, "--output", tmp_path / "harness.json", env=env)
    harness = json.loads((tmp_path / "harness.json").read_text())
    # what `minigpt eval suite` runs, in this process (a second process costs lm-eval's import)
    suite = run_suite(model, tasks.split(","), "cpu", limit=ROWS, data_dir=eval_data_dir,
                      progress=False)["tasks"]  # fmt: skip
    for name in tasks.split(","):
        bridge = harness[name]
        assert bridge["acc,none"] == pytest.approx(suite[name]["acc"]), name
        if "acc_norm,none" in bridge:
            assert bridge["acc_norm,none"] == pytest.approx(suite[name]["acc_norm"]), name
    assert 0 < harness["boolq"]["acc,none"] < 1  # the 0 of the unmapped label is gone


@pytest.fixture
def checkpoint(tmp_path):
    from minigpt.checkpoints import save_model

    save_model(tmp_path / "ckpt", GPT(tiny_config()), step=0)
    return tmp_path / "ckpt"


def test_a_task_typo_is_one_line_with_the_closest_names(checkpoint, capsys):
    from minigpt.cli import main

    assert main(["eval", "harness", "--model", str(checkpoint), "--tasks", "copa,hellaswg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "lm-eval has no task 'hellaswg'; did you mean hellaswag" in err


def test_a_hub_task_offline_fails_at_once_in_one_line(checkpoint, capsys, monkeypatch):
    import sys
    import time

    from minigpt.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module in ("huggingface_hub.constants", "datasets.config"):  # restored afterwards
        if module in sys.modules:
            monkeypatch.setattr(sys.modules[module], "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    argv = ["eval", "harness", "--model", str(checkpoint), "--tasks", "lambada_openai"]
    assert main([*argv, "--limit", "2"]) == 2
    assert time.monotonic() - start < 25  # the hub's retries alone take ~30 s
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "lambada_openai: the task's data comes from the Hugging Face hub" in err
    assert "copa" in err  # what runs offline instead


def test_hub_reachable_is_false_at_once_when_offline_is_set(monkeypatch):
    from minigpt.evals.harness import hub_reachable

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub_reachable() is False
