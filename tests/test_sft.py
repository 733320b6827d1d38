"""Supervised fine-tuning: the conversation batch source, the masked loss, and `minigpt sft`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from minigpt.checkpoints import save_model
from minigpt.config import load_config
from minigpt.data.chat import bucket_length, collate_sft, length_buckets
from minigpt.errors import MinigptError
from minigpt.model import GPT, IGNORE_INDEX
from minigpt.tokenizer import get_tokenizer
from minigpt.train.finetune import ConversationBatches, split_conversations
from minigpt.train.sft import ConversationEval, load_examples, sft

from conftest import SRC, assert_one_graph_per_length_bucket, run_minigpt, tiny_config

CONVERSATIONS = [
    [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"A{i}."}]
    for i in range(12)
]


def _examples():
    tok = get_tokenizer()
    return [tok.render_conversation(c, 64)[:2] for c in CONVERSATIONS]


def _drain(source, n):
    return [source.next_batch() for _ in range(n)]


def test_batches_are_deterministic_and_resume_exactly():
    examples = _examples()
    a = ConversationBatches(examples, 3, seed=7, pad_id=0)
    b = ConversationBatches(examples, 3, seed=7, pad_id=0)
    first = _drain(a, 5)  # crosses an epoch boundary (12 examples, 3 per batch)
    for (xa, ya), (xb, yb) in zip(first, _drain(b, 5), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    state = a.state_dict()
    assert state["epoch"] == 1 and state["pos"] == 3
    c = ConversationBatches(examples, 3, seed=7, pad_id=0)
    c.load_state_dict(state)
    for (xa, ya), (xc, yc) in zip(_drain(a, 6), _drain(c, 6), strict=True):
        assert torch.equal(xa, xc) and torch.equal(ya, yc)
    with pytest.raises(MinigptError):
        ConversationBatches(examples, 3, seed=8, pad_id=0).load_state_dict(state)


def test_ranks_take_disjoint_slices_of_one_stream():
    examples = _examples()
    whole = ConversationBatches(examples, 4, seed=1, pad_id=0).next_batch()[0]
    for rank, rows in ((0, slice(0, 2)), (1, slice(2, 4))):
        part = ConversationBatches(examples, 2, 1, 0, rank=rank, world_size=2).next_batch()[0]
        assert torch.equal(part, whole[rows, : part.size(1)])


def test_validation_split_and_batches_are_fixed():
    train, val = split_conversations(CONVERSATIONS, 0.25)
    assert len(val) == 3 and val == CONVERSATIONS[-3:] and len(train) == 9
    ev = ConversationEval(_examples()[-3:], 2, pad_id=0)
    assert [x.tolist() for x, _ in ev.batches()] == [x.tolist() for x, _ in ev.batches()]
    with pytest.raises(MinigptError):
        split_conversations(CONVERSATIONS[:1], 0.5)


def test_sft_loss_is_masked_cross_entropy(one_thread):
    tok = get_tokenizer()
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    examples = _examples()[:3]
    x, y = collate_sft(examples, tok.eot_id)
    _, loss = model(x, y)
    logits, _ = model(x)
    total, count = 0.0, 0
    for row, (ids, mask) in enumerate(examples):
        for t in range(len(ids) - 1):
            if mask[t + 1]:  # an assistant token or its <|END|> is the target
                logp = torch.log_softmax(logits[row, t].double(), -1)
                total -= logp[ids[t + 1]].item()
                count += 1
    assert count == int((y != IGNORE_INDEX).sum())
    assert abs(loss.item() - total / count) < 1e-5
    # only assistant content and <|END|> are ever targets
    targets = set(y[y != IGNORE_INDEX].tolist())
    assert tok.end_id in targets and tok.user_id not in targets


def _write_config(tmp_path, data):
    config = tmp_path / "sft.toml"
    config.write_text(
        f"""
[data]
source = "{data}"
format = "messages"
val_fraction = 0.25
[train]
max_steps = 3
micro_batch = 2
total_batch_tokens = 128
sequence_length = 32
max_lr = 1e-3
min_lr = 1e-4
warmup_steps = 1
checkpoint_every = 2
eval_every = 2
device = "cpu"
dtype = "float32"
[eval]
sample_prompts = ["Hi"]
sample_tokens = 4
[log]
progress = false
tensorboard = false
"""
    )
    return config


def test_cli_sft_trains_evaluates_and_resumes(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_model(init, GPT(tiny_config()))
    config, run = _write_config(tmp_path, data), tmp_path / "run"
    threads = {"env": {"OMP_NUM_THREADS": "1"}}
    result = run_minigpt(
        "sft", config, "--init", init, "--out", run, "--train.max_steps=2", **threads
    )
    assert "9 train / 3 val examples" in result.stdout
    assert (run / "checkpoints" / "step_0000002").is_dir()
    run_minigpt("sft", config, "--out", run, "--resume", "latest", **threads)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records)
    assert any("chat_samples" in r for r in records)
    assert max(r["step"] for r in records) == 3
    whole = tmp_path / "whole"
    run_minigpt("sft", config, "--init", init, "--out", whole, **threads)
    again = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    last = lambda rs: [r["train_loss"] for r in rs if r["step"] == 3 and "train_loss" in r]  # noqa: E731
    assert last(records) == last(again) and last(records)  # resumed exactly


def test_cli_sft_rejects_bad_init_and_source(tmp_path):
    config = _write_config(tmp_path, tmp_path / "missing.jsonl")
    bad = run_minigpt("sft", config, "--init", tmp_path / "nope", check=False)
    assert bad.returncode != 0 and "--init" in bad.stderr and "Traceback" not in bad.stderr
    init = tmp_path / "init"
    save_model(init, GPT(tiny_config()))
    bad = run_minigpt("sft", config, "--init", init, "--out", tmp_path / "r", check=False)
    assert bad.returncode != 0 and "missing.jsonl" in bad.stderr and "Traceback" not in bad.stderr


def test_sft_help_does_not_import_torch():
    code = (
        "import sys\nfrom minigpt.cli import build_parser\n"
        "try:\n    build_parser().parse_args(['sft', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'sft --help imported torch'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}
    )
    assert result.returncode == 0, result.stderr
    assert "--init" in result.stdout


def test_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes of 1 conversation each against one process with batches of
    2: the same conversations, the same token-weighted loss, so the same training losses."""
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_model(init, GPT(tiny_config()))
    config = _write_config(tmp_path, data)
    common = ["--init", str(init), "--train.total_batch_tokens=64", "--eval.sample_tokens=0"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_minigpt("sft", config, *common, "--out", single, env={"OMP_NUM_THREADS": "1"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [
        "-m",
        "minigpt",
        "sft",
        str(config),
        *common,
        "--train.micro_batch=1",
        "--out",
        str(ddp),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout

    def losses(run, key):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]

    for key in ("train_loss", "val_loss"):
        assert len(losses(single, key)) >= 2
        for (s1, l1), (s2, l2) in zip(losses(single, key), losses(ddp, key), strict=True):
            assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)


def test_compiled_fine_tuning_pads_batches_to_length_buckets(one_thread):
    """Under train.compile, batches pad to powers of two from 64 and the sequence length; the
    padding (pad inputs, -100 targets) leaves the loss as it was."""
    assert length_buckets(1024) == (64, 128, 256, 512, 1024)
    assert length_buckets(300) == (64, 128, 256, 300) and length_buckets(32) == (32,)
    assert [bucket_length(n, (64, 128)) for n in (1, 64, 65, 128, 129)] == [64, 64, 128, 128, 129]
    examples = _examples()
    x, y = collate_sft(examples[:3], pad_id=7)
    px, py = collate_sft(examples[:3], 7, length_buckets(256))
    assert px.shape == py.shape == (3, 64) and x.size(1) < 64
    assert torch.equal(px[:, : x.size(1)], x) and (px[:, x.size(1) :] == 7).all()
    assert torch.equal(py[:, : x.size(1)], y) and (py[:, x.size(1) :] == IGNORE_INDEX).all()
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    assert model(px, py)[1].item() == pytest.approx(model(x, y)[1].item(), abs=1e-6)
    stream = ConversationBatches(examples, 3, 0, 0, buckets=length_buckets(256))
    assert {b[0].shape for b in _drain(stream, 8)} == {(3, 64)}  # across epochs: 12 examples
    evaluated = ConversationEval(examples, 3, 0).batches()  # uncompiled: no bucketing
    assert all(inputs.size(1) < 64 for inputs, _ in evaluated)


VARIED = [  # replies of 1 to ~240 tokens: unbucketed, nearly every batch has its own length
    [{"role": "user", "content": f"Count {i}."}, {"role": "assistant", "content": "one " * n}]
    for i, n in enumerate([1, 200, 9, 120, 40, 230, 15, 90, 60, 170, 3, 140, 25, 75, 240, 50])
]


def test_compiled_sft_compiles_one_graph_per_length_bucket(tmp_path, counted_compile, one_thread):
    """20 compiled SFT steps on conversations of widely varied lengths: one graph per bucket the
    batches fall into, and no recompile-limit fallback to eager; unbucketed, the same stream
    has more lengths than dynamo's recompile limit allows."""
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in VARIED))
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_model(init, GPT(tiny_config(block_size=256)))
    overrides = {
        "train.compile": "true", "train.max_steps": "20", "train.sequence_length": "256",
        "train.total_batch_tokens": "512", "train.checkpoint_every": "20",
        "train.eval_every": "20", "eval.sample_tokens": "0",
    }  # fmt: skip
    config = load_config(_write_config(tmp_path, data), overrides)
    sft(config, tmp_path / "run", init=init)
    train, _ = load_examples(config, get_tokenizer(), verbose=False)
    stream = ConversationBatches(train, config.train.micro_batch, config.train.seed, 0)
    assert_one_graph_per_length_bucket(counted_compile, stream, config.train)


def _write_alpaca(tmp_path, n=6):
    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_with_the_wrong_format_says_every_record_was_skipped_and_why(tmp_path, capsys):
    from minigpt.cli import main

    config, init = _write_config(tmp_path, _write_alpaca(tmp_path)), tmp_path / "init"
    save_model(init, GPT(tiny_config()))
    argv = ["sft", str(config), "--init", str(init), "--out", str(tmp_path / "r")]
    assert main([*argv, "--data.format=dolly"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "all 6 records skipped as data.format='dolly'" in err
    assert "6 'response' missing or not a string" in err
    assert "hh-rlhf, alpaca, dolly, messages, chitchat" in err
