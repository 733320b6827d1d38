"""DPO against independent references: the paper's formula written out here, a live reference
model for the stored log-probs, an uninterrupted run for SIGKILL + resume, one process for DDP."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minigpt.checkpoints import save_model
from minigpt.config import DPOSection, load_config
from minigpt.data.preference import PreferencePair, collate_pairs, render_pairs
from minigpt.errors import MinigptError
from minigpt.model import GPT, IGNORE_INDEX
from minigpt.tokenizer import get_tokenizer
from minigpt.train.dpo import (
    METRICS,
    REFERENCE_FILE,
    PairBatches,
    PreferenceObjective,
    check_dpo_section,
    dpo,
    load_pairs,
    preference_loss,
    reference_logps,
    sequence_logps,
)
from minigpt.train.plot import panels

from conftest import REPO, SRC, assert_one_graph_per_length_bucket, run_minigpt, tiny_config

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
WORDS = "apple river stone cloud tiger piano candle forest orange silver garden rocket".split()


def _pairs(n=12):
    """Multi-turn and one-turn prompts, replies of different lengths (so rows pad differently)."""
    pairs = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        prompt = [{"role": "user", "content": f"Tell me about {w}."}]
        if i % 3 == 0:
            prompt = [
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello."},
                *prompt,
            ]
        pairs.append(PreferencePair(prompt, f"Sure: {w} is nice" + " indeed" * (i % 4), "No."))
    return pairs


def _rendered(n=12, max_tokens=64):
    return render_pairs(_pairs(n), get_tokenizer(), max_tokens)[0]


def _model(seed):
    torch.manual_seed(seed)
    return GPT(tiny_config()).eval()


def _paper_logps(model, pairs):
    """log p(reply | prompt) of each pair's (chosen, rejected), one unpadded sequence at a time:
    per-token log-softmax, the reply's ids gathered and summed."""
    out = []
    for pair in pairs:
        row = []
        for reply in (pair.chosen, pair.rejected):
            ids = torch.tensor([pair.prompt + reply])
            logits, _ = model(ids[:, :-1])
            logp = torch.log_softmax(logits.double(), -1)[0]
            start = len(pair.prompt) - 1  # the position that predicts the reply's first token
            row.append(sum(logp[start + k, t] for k, t in enumerate(reply)))
        out.append(row)
    return out


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(one_thread):
    model = _model(0)
    batch = collate_pairs(_rendered(6), get_tokenizer().eot_id)
    objective = PreferenceObjective(DPOSection(), copy.deepcopy(model))
    loss, sums = objective(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert sums["rewards/chosen"].item() == sums["rewards/rejected"].item() == 0
    assert sums["rewards/margins"].item() == sums["rewards/accuracies"].item() == 0


def test_loss_rewards_and_gradients_match_the_papers_formula(one_thread):
    policy, reference = _model(0), _model(1)
    pairs, beta = _rendered(6), 0.3
    batch = collate_pairs(pairs, get_tokenizer().eot_id)
    objective = PreferenceObjective(DPOSection(beta=beta), reference)
    loss, sums = objective(policy, batch)
    grads = torch.autograd.grad(loss, list(policy.parameters()))

    pol, ref = _paper_logps(policy, pairs), _paper_logps(reference, pairs)
    with torch.no_grad():
        rewards = [
            [beta * (p - r).item() for p, r in zip(pp, rr, strict=True)]
            for pp, rr in zip(pol, ref, strict=True)
        ]
    h = [(p[0] - r[0]) - (p[1] - r[1]) for p, r in zip(pol, ref, strict=True)]
    expected = sum(-F.logsigmoid(beta * x) for x in h) / len(h)
    expected_grads = torch.autograd.grad(expected, list(policy.parameters()))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert sums["rewards/chosen"].item() == pytest.approx(sum(r[0] for r in rewards), abs=1e-5)
    assert sums["rewards/rejected"].item() == pytest.approx(sum(r[1] for r in rewards), abs=1e-5)
    wins = sum(r[0] > r[1] for r in rewards)
    assert sums["rewards/accuracies"].item() == wins and 0 < wins < len(pairs)
    assert sums["logps/chosen"].item() == pytest.approx(sum(p[0].item() for p in pol), rel=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got.double(), want.double(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("loss_type", "eps", "formula"),
    [
        ("sigmoid", 0.0, lambda h, b, e: -math.log(1 / (1 + math.exp(-b * h)))),
        (
            "sigmoid",
            0.1,
            lambda h, b, e: (
                -(1 - e) * math.log(1 / (1 + math.exp(-b * h)))
                - e * math.log(1 / (1 + math.exp(b * h)))
            ),
        ),
        (
            "robust",
            0.1,
            lambda h, b, e: (
                (
                    -(1 - e) * math.log(1 / (1 + math.exp(-b * h)))
                    + e * math.log(1 / (1 + math.exp(b * h)))
                )
                / (1 - 2 * e)
            ),
        ),
        ("ipo", 0.0, lambda h, b, e: (h - 1 / (2 * b)) ** 2),
        ("hinge", 0.0, lambda h, b, e: max(0.0, 1 - b * h)),
    ],
)
def test_loss_variants_match_their_formulas(loss_type, eps, formula):
    policy = torch.tensor([-3.0, -10.0, -4.0, -2.0], dtype=torch.float64)  # chosen, then rejected
    reference = torch.tensor([-5.0, -9.0, -6.0, -4.0], dtype=torch.float64)
    section = DPOSection(beta=0.5, loss_type=loss_type, label_smoothing=eps)
    losses, chosen, rejected = preference_loss(policy, reference, section)
    h = [(-3 + 5) - (-4 + 6), (-10 + 9) - (-2 + 4)]  # 0 and -3
    assert losses.tolist() == pytest.approx([formula(x, 0.5, eps) for x in h], abs=1e-12)
    assert chosen.tolist() == [1.0, -0.5] and rejected.tolist() == [1.0, 1.0]


def test_only_reply_tokens_count(one_thread):
    model, tok = _model(0), get_tokenizer()
    pairs = _rendered(4)
    inputs, targets = collate_pairs(pairs, tok.eot_id)[:2]
    logits, _ = model(inputs)
    base = sequence_logps(logits, targets)
    # whatever the logits say where the target is ignored (prompt, padding), nothing changes
    noisy = torch.where((targets == IGNORE_INDEX)[..., None], torch.randn_like(logits) * 50, logits)
    assert torch.equal(sequence_logps(noisy, targets), base)
    # another padding id, or padding to a longer partner's length, leaves every pair's log-probs
    repadded = sequence_logps(model(collate_pairs(pairs, 0)[0])[0], targets)
    assert torch.allclose(repadded, base, atol=1e-5)
    long = render_pairs(
        [PreferencePair([{"role": "user", "content": "x " * 30}], "y " * 20, "z")], tok, 64
    )[0]
    inputs2, targets2 = collate_pairs(pairs[:1] + long, tok.eot_id)[:2]
    alone = sequence_logps(model(inputs2)[0], targets2)[[0, 2]]
    assert torch.allclose(alone, base[[0, 4]], atol=1e-5)


def test_stored_reference_logps_equal_the_live_reference_model(one_thread):
    model, pairs = _model(2), _rendered(7)
    table = reference_logps(model, pairs, micro_batch=3, pad_id=get_tokenizer().eot_id)
    live = PreferenceObjective(DPOSection(), model).reference_logps(
        *collate_pairs(pairs, get_tokenizer().eot_id)
    )
    assert torch.allclose(table.T.flatten(), live, atol=1e-5)
    with torch.no_grad():
        paper = torch.tensor([[float(x) for x in row] for row in _paper_logps(model, pairs)])
    assert torch.allclose(table, paper, atol=1e-4)


def test_bad_dpo_settings_are_refused_with_the_key():
    for section, key in [
        (DPOSection(beta=0), "dpo.beta"),
        (DPOSection(loss_type="kto"), "dpo.loss_type"),
        (DPOSection(loss_type="ipo", label_smoothing=0.1), "dpo.label_smoothing"),
        (DPOSection(loss_type="robust"), "dpo.loss_type=robust"),
        (DPOSection(label_smoothing=0.5), "dpo.label_smoothing"),
        (DPOSection(reference="both"), "dpo.reference"),
    ]:
        with pytest.raises(MinigptError, match=key):
            check_dpo_section(section)


# ------------------------------------------------------------------------------ end to end
def _write_data(tmp_path, n=16):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in _pairs(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_config(tmp_path, data, **sections):
    text = f"""
[data]
source = "{data}"
format = "trl"
val_fraction = 0.25
[train]
max_steps = 5
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
    config = tmp_path / "dpo.toml"
    config.write_text(text)
    return config


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _series(run, key):
    return [(r["step"], r[key]) for r in _records(run) if key in r]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """(config, init, run): an uninterrupted 5-step CLI run on 16 TRL-format pairs."""
    tmp_path = tmp_path_factory.mktemp("dpo")
    config, init, run = (
        _write_config(tmp_path, _write_data(tmp_path)),
        tmp_path / "init",
        tmp_path / "run",
    )
    torch.manual_seed(0)
    save_model(init, GPT(tiny_config()))
    done = run_minigpt("dpo", config, "--init", init, "--out", run, env=ONE_THREAD)
    assert "12 train / 4 val pairs" in done.stdout and "computed" in done.stdout
    return config, init, run


def test_cli_dpo_logs_trl_metrics_everywhere(baseline, tmp_path):
    config, init, whole = baseline
    first = next(r for r in _records(whole) if "eval_rewards/margins" in r)
    assert first["step"] == 0 and first["eval_rewards/margins"] == 0  # policy == reference
    assert first["eval_rewards/accuracies"] == 0
    assert first["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    last = _records(whole)[-1]
    assert last["step"] == 5 and {f"eval_{m}" for m in METRICS} <= last.keys()
    assert all(m in r for r in _records(whole) if "train_loss" in r for m in METRICS)
    assert any("chat_samples" in r for r in _records(whole))
    assert (whole / REFERENCE_FILE).is_file() and (whole / "init.txt").is_file()
    log = (whole / "log.txt").read_text()
    assert "5 train" in log and "4 reward_acc" in log
    out = tmp_path / "dpo.png"
    run_minigpt("plot", whole, "--out", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [title for title, *_ in panels({"run": _records(whole)})]
    assert titles == ["loss", "DPO reward accuracy", "DPO reward margin"]


def test_cli_dpo_resumes_exactly_after_sigkill(baseline, tmp_path):
    config, init, whole = baseline
    run = tmp_path / "run"
    killed = run_minigpt(
        "dpo", config, "--init", init, "--out", run,
        check=False, fault="step:3", env=ONE_THREAD,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    resumed = run_minigpt("dpo", config, "--out", run, "--resume", "latest", env=ONE_THREAD)
    assert "reference log-probs read from" in resumed.stdout  # not recomputed
    for key in ("train_loss", "rewards/accuracies", "logps/rejected", "val_loss"):
        assert _series(run, key) == _series(whole, key) and len(_series(run, key)) >= 3


def test_cli_dpo_refuses_bad_settings_before_training(tmp_path):
    config, init = _write_config(tmp_path, _write_data(tmp_path)), tmp_path / "init"
    save_model(init, GPT(tiny_config()))
    bad = run_minigpt("dpo", config, "--init", init, "--dpo.loss_type=kto", check=False)
    assert bad.returncode == 2 and "dpo.loss_type" in bad.stderr and "Traceback" not in bad.stderr


def test_two_gloo_processes_match_one_process(baseline, tmp_path):
    """torchrun with 2 CPU processes of 1 pair each against one process with batches of 2
    pairs; the ranks share the reference pass and the held-out evaluation."""
    config, init, single = baseline
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "minigpt", "dpo", str(config), "--init", str(init), "--train.micro_batch=1"]
    ddp = tmp_path / "ddp"
    result = subprocess.run(
        [*cmd, "--eval.sample_tokens=0", "--out", str(ddp)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    for key in ("train_loss", "rewards/margins", "val_loss", "eval_rewards/margins"):
        assert len(_series(single, key)) >= 3
        for (s1, a), (s2, b) in zip(_series(single, key), _series(ddp, key), strict=True):
            assert s1 == s2 and a == pytest.approx(b, abs=1e-5)


def test_held_out_reward_accuracy_climbs_on_a_learnable_task(tmp_path, one_thread):
    """Chosen replies are always polite ("Sure: ..."), rejected ones curt ("No."): on held-out
    pairs, reward accuracy goes from 0 (policy == live reference) to > 0.9."""
    init = tmp_path / "init"
    torch.manual_seed(0)
    save_model(init, GPT(tiny_config()))
    config = load_config(
        _write_config(tmp_path, _write_data(tmp_path, 24)),
        {"train.max_steps": "30", "train.eval_every": "30", "train.checkpoint_every": "30",
         "train.max_lr": "3e-3", "eval.sample_tokens": "0", "dpo.reference": "model"},
    )  # fmt: skip
    dpo(config, tmp_path / "run", init=init)
    accuracy = _series(tmp_path / "run", "eval_rewards/accuracies")
    assert accuracy[0] == (0, 0.0) and accuracy[-1][0] == 30 and accuracy[-1][1] > 0.9


def test_compiled_dpo_compiles_one_graph_per_length_bucket(tmp_path, counted_compile, one_thread):
    """20 compiled DPO steps on pairs of widely varied lengths: one graph per bucket the pair
    batches fall into, and no recompile-limit fallback to eager; unbucketed, the same stream
    has more lengths than dynamo's recompile limit allows."""
    lengths = [1, 200, 9, 120, 40, 230, 15, 90, 60, 170, 3, 140, 25, 75, 240, 50]
    rows = [
        {"prompt": f"Count {i}.", "chosen": "one " * n, "rejected": "two " * (n // 2 + 1)}
        for i, n in enumerate(lengths)
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_model(init, GPT(tiny_config(block_size=256)))
    overrides = {
        "train.compile": "true", "train.max_steps": "20", "train.sequence_length": "256",
        "train.micro_batch": "1", "train.total_batch_tokens": "256",
        "train.checkpoint_every": "20", "train.eval_every": "20", "eval.sample_tokens": "0",
    }  # fmt: skip
    config = load_config(_write_config(tmp_path, data), overrides)
    dpo(config, tmp_path / "run", init=init)
    train, _ = load_pairs(config, get_tokenizer(), verbose=False)
    stream = PairBatches(train, config.train.micro_batch, config.train.seed, 0)
    assert_one_graph_per_length_bucket(counted_compile, stream, config.train)


def test_dpo_help_does_not_import_torch():
    code = (
        "import sys\nfrom minigpt.cli import build_parser\n"
        "try:\n    build_parser().parse_args(['dpo', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'dpo --help imported torch'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}
    )
    assert result.returncode == 0, result.stderr
    assert "--init" in result.stdout and "reference" in result.stdout


@pytest.mark.parametrize("verb", ["train", "sft", "dpo"])
def test_every_training_verb_exits_75_when_a_stop_signal_ends_it(
    verb, monkeypatch, tmp_path, capsys
):
    """The CLI's one dispatcher turns TrainingInterrupted into status 75 for all three verbs."""
    import signal

    from minigpt.cli import main
    from minigpt.errors import EXIT_INTERRUPTED, TrainingInterrupted
    from minigpt.train import dpo, pretrain, sft

    def stopped(*args, **kwargs):
        raise TrainingInterrupted(7, signal.SIGTERM)

    module, config = {
        "train": (pretrain, "configs/demo-cpu.toml"),
        "sft": (sft, "configs/sft-demo-cpu.toml"),
        "dpo": (dpo, "configs/dpo-demo-cpu.toml"),
    }[verb]
    monkeypatch.setattr(module, {"train": "pretrain"}.get(verb, verb), stopped)
    argv = [verb, str(REPO / config), "--out", str(tmp_path / "run")]
    if verb != "train":
        argv += ["--init", str(tmp_path)]
    assert main(argv) == EXIT_INTERRUPTED
    assert "stopped by SIGTERM after step 7" in capsys.readouterr().err


def test_dpo_with_the_wrong_format_says_every_record_was_skipped_and_why(tmp_path, capsys):
    from minigpt.cli import main

    config, init = _write_config(tmp_path, _write_data(tmp_path, n=5)), tmp_path / "init"
    save_model(init, GPT(tiny_config()))
    argv = ["dpo", str(config), "--init", str(init), "--out", str(tmp_path / "r")]
    assert main([*argv, "--data.format=hh-rlhf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "all 5 records skipped as data.format='hh-rlhf' (5 " in err  # the reason follows
    assert "hh-rlhf, trl, alpaca, dolly, messages, chitchat" in err
