"""Tokens/s of the whole `minigpt prepare files` command, side by side with two references.

    python bench/prepare_throughput.py [--mb 60] [--workers N]

(a) baseline: build-nanogpt's fineweb.py way: documents sent one at a time (chunksize 16) to a
    multiprocessing pool running tiktoken's `encode_ordinary`, uint16 arrays gathered into shards.
(b) limit: tiktoken's multi-threaded batch encoder on the same text already in memory, no I/O,
    no parsing, no writing: what tokenization alone costs on this machine.
Goal: `minigpt prepare` at least as fast as (a) and within 15% of (b). The corpus is the bundled
Shakespeare cut into ~3 KB documents, written as JSONL files totalling `--mb` megabytes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from minigpt.data.prepare import builtin_documents
from minigpt.data.shards import read_manifest
from minigpt.tokenizer import get_tokenizer

SHARD_TOKENS = 10_000_000


def make_corpus(directory: Path, megabytes: int, n_files: int = 4) -> list[str]:
    """~3 KB documents cut from the bundled corpus, cycled to the requested size."""
    paragraphs = [p for work in builtin_documents() for p in work.split("\n\n") if p.strip()]
    docs, current, size = [], [], 0
    target = megabytes * 1_000_000
    i = 0
    while size < target:
        paragraph = paragraphs[i % len(paragraphs)]
        current.append(paragraph)
        if sum(map(len, current)) > 3000:
            docs.append(f"[{len(docs)}] " + "\n\n".join(current))  # numbered: no two docs alike
            size += len(docs[-1].encode())
            current = []
        i += 1
    per_file = -(-len(docs) // n_files)
    for f in range(n_files):
        with open(directory / f"part{f}.jsonl", "w", encoding="utf-8") as out:
            for doc in docs[f * per_file : (f + 1) * per_file]:
                out.write(json.dumps({"text": doc}) + "\n")
    return docs


_encoder = None


def _init_worker() -> None:
    global _encoder
    _encoder = get_tokenizer()


def _tokenize(doc: str) -> np.ndarray:
    ids = [_encoder.eot_id] + _encoder.encode(doc)
    return np.array(ids, dtype=np.uint16)


def baseline_pool(files: list[Path], out: Path, workers: int) -> int:
    """build-nanogpt style: pool.imap(tokenize, docs, chunksize=16), .npy shards."""

    def documents():
        for path in files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)["text"]

    buffer = np.empty(SHARD_TOKENS, dtype=np.uint16)
    filled = total = shard = 0
    with mp.Pool(workers, initializer=_init_worker) as pool:
        for tokens in pool.imap(_tokenize, documents(), chunksize=16):
            total += tokens.size
            while tokens.size:
                take = min(SHARD_TOKENS - filled, tokens.size)
                buffer[filled : filled + take] = tokens[:take]
                filled += take
                tokens = tokens[take:]
                if filled == SHARD_TOKENS:
                    np.save(out / f"base_{shard:06d}.npy", buffer)
                    shard, filled = shard + 1, 0
    np.save(out / f"base_{shard:06d}.npy", buffer[:filled])
    return total


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=60, help="corpus size in MB")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    tok = get_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = make_corpus(tmp, args.mb)
        files = sorted(tmp.glob("part*.jsonl"))
        print(
            f"corpus: {len(docs):,} documents, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB"
        )

        encoded, t_limit = timed(lambda: tok.encode_batch(docs, num_threads=args.workers))
        n_tokens = sum(map(len, encoded)) + len(docs)
        del encoded

        (tmp / "base").mkdir()
        base_tokens, t_base = timed(lambda: baseline_pool(files, tmp / "base", args.workers))

        cmd = [sys.executable, "-m", "minigpt", "prepare", "files", *map(str, files)]
        cmd += ["--out", str(tmp / "ours"), "--shard-tokens", str(SHARD_TOKENS)]
        cmd += ["--val-tokens", "1M", "--workers", str(args.workers)]
        _, t_ours = timed(lambda: subprocess.run(cmd, check=True, capture_output=True))
        ours_tokens = read_manifest(tmp / "ours")["tokens"]["total"]

    assert base_tokens == ours_tokens == n_tokens, (base_tokens, ours_tokens, n_tokens)
    rate = {
        name: n_tokens / t for name, t in [("limit", t_limit), ("base", t_base), ("ours", t_ours)]
    }
    print(f"tokens: {n_tokens:,}; workers: {args.workers}; CPUs: {os.cpu_count()}")
    print(
        f"(b) limit: tiktoken batch encode, in memory  {rate['limit']:>12,.0f} tokens/s  {t_limit:6.2f} s"
    )
    print(
        f"(a) baseline: mp.Pool imap encode_ordinary    {rate['base']:>12,.0f} tokens/s  {t_base:6.2f} s"
    )
    print(
        f"    minigpt prepare files (whole command)     {rate['ours']:>12,.0f} tokens/s  {t_ours:6.2f} s"
    )
    print(f"ours / baseline = {rate['ours'] / rate['base']:.2f}x (goal >= 1.00)")
    print(f"ours / limit    = {rate['ours'] / rate['limit']:.2f}  (goal >= 0.85)")


if __name__ == "__main__":
    main()
