"""`minigpt generate` end to end, against the engine run in-process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from minigpt.checkpoints import save_model
from minigpt.engine import Engine, Sampling
from minigpt.model import GPT
from minigpt.tokenizer import get_tokenizer
from tests.conftest import SRC, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(directory, model, step=0)
    return directory, model


def test_greedy_generation_prints_each_sample_with_and_without_cache(cli, checkpoint):
    directory, model = checkpoint
    tok = get_tokenizer()
    prompts = ["Once upon a time", ""]
    args = ["generate", "--model", directory, "--prompt", prompts[0], "--prompt", ""]
    args += ["--num-samples", "2"]
    args += ["--temperature", "0", "--max-new-tokens", "12"]
    ids = [tok.encode(prompts[0]), [tok.eot_id]]
    outs = Engine(model, tok.n_vocab).generate(ids, 12, Sampling(temperature=0), num_samples=2)
    expected = ""
    for seq, out in enumerate(outs):
        text = prompts[seq // 2] + tok.decode([t for t in out if t != tok.eot_id])
        expected += f"=== prompt {seq // 2 + 1}, sample {seq % 2 + 1} ===\n{text}\n"
    result = cli(*args, env=ENV)
    assert result.stdout == expected
    assert "tokens/s" in result.stderr
    assert cli(*args, "--no-kv-cache", env=ENV).stdout == expected


def test_greedy_makes_one_sample_per_prompt_unless_asked(cli, checkpoint):
    directory, _ = checkpoint
    args = ["generate", "--model", directory, "--prompt", "The cat", "--prompt", "A dog"]
    args += ["--temperature", "0", "--max-new-tokens", "5"]
    out = cli(*args, env=ENV).stdout
    assert out.count("=== prompt") == 2 and "=== prompt 2, sample 1 ===" in out
    assert "sample 2" not in out
    # asked for (test above) or sampling (the default of 5), there are several
    args[args.index("0")] = "1"
    assert cli(*args, "--seed", "0", env=ENV).stdout.count("=== prompt") == 10


def test_prompt_file_and_sampling_seed(cli, checkpoint, tmp_path):
    directory, _ = checkpoint
    (tmp_path / "prompts.txt").write_text("The cat\n\nThe dog\n")
    args = ["generate", "--model", directory, "--prompt-file", tmp_path / "prompts.txt"]
    args += ["--num-samples", "3", "--max-new-tokens", "6", "--seed", "3", "--top-p", "0.9"]
    first = cli(*args, env=ENV).stdout
    assert first.count("=== prompt") == 6 and "=== prompt 2, sample 3 ===\nThe dog" in first
    assert cli(*args, env=ENV).stdout == first


def test_bad_generate_requests_fail_with_one_clear_line(cli, checkpoint, tmp_path):
    directory, _ = checkpoint
    result = cli("generate", "--model", directory, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "minigpt generate: error: no prompt: give --prompt TEXT or --prompt-file FILE"
    )
    result = cli("generate", "--model", tmp_path / "nope", "--prompt", "x", check=False)
    assert result.returncode == 2 and "no such file or directory" in result.stderr
    result = cli("generate", "--model", directory, "--prompt", "x " * 70, check=False)
    assert result.returncode == 2 and "more than the model's context of 64" in result.stderr


def test_prompts_are_counted_from_one_in_errors_as_in_the_output(cli, checkpoint):
    directory, _ = checkpoint
    args = ["generate", "--model", directory, "--prompt", "fine", "--prompt", "x " * 70]
    result = cli(*args, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("minigpt generate: error: prompt 2 has 71 tokens, more than")


def test_top_k_zero_means_no_cut_as_on_the_server(cli, checkpoint):
    directory, model = checkpoint
    tok = get_tokenizer()
    args = ["generate", "--model", directory, "--prompt", "The cat", "--num-samples", "1"]
    args += ["--max-new-tokens", "6", "--seed", "4", "--top-k", "0"]
    out = Engine(model, tok.n_vocab).generate([tok.encode("The cat")], 6, Sampling(), seed=4)
    text = "The cat" + tok.decode([t for t in out[0] if t != tok.eot_id])
    assert cli(*args, env=ENV).stdout == f"=== prompt 1, sample 1 ===\n{text}\n"
    result = cli(*args[:-1], "-1", check=False)
    assert result.returncode == 2 and "top_k must be >= 0 (0 = no top-k cut)" in result.stderr


def test_help_of_the_inference_verbs_does_not_import_torch():
    code = (
        "import sys\n"
        "from minigpt.cli import build_parser\n"
        "for verb in ('generate', 'chat'):\n"
        "    try:\n"
        "        build_parser().parse_args([verb, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC)},
        check=True,
    )
    assert "--max-new-tokens" in result.stdout and "/system TEXT" in result.stdout
    assert result.stdout.splitlines()[-1] == "False"
