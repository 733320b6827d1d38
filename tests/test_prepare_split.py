"""The default validation split of a corpus smaller than one shard."""

from __future__ import annotations

from minigpt.cli import main as cli_main
from minigpt.data.prepare import small_corpus_val_tokens
from minigpt.data.shards import list_shards, read_manifest, read_shard
from minigpt.tokenizer import get_tokenizer


def test_small_corpus_gets_a_tenth_but_at_least_one_window():
    assert small_corpus_val_tokens(1_000_000) == 100_000  # 10%
    assert small_corpus_val_tokens(5_000) == 1025  # one 1,024-token window and its target
    assert small_corpus_val_tokens(600) == 300  # too small for that: half


def test_prepare_splits_a_small_corpus_by_default_and_says_so(tmp_path, capsys):
    text = "To be, or not to be, that is the question. " * 400
    (tmp_path / "small.txt").write_text(text)
    out = tmp_path / "d"
    assert cli_main(["prepare", "files", str(tmp_path / "small.txt"), "--out", str(out)]) == 0
    total = 1 + len(get_tokenizer().encode(text))  # <|endoftext|> + the document
    manifest = read_manifest(out)
    assert manifest["tokens"] == {"total": total, "train": total - 1025, "val": 1025}
    val, train = (read_shard(list_shards(out, s)[0]) for s in ("val", "train"))
    assert len(val) == 1025 and len(train) == total - 1025
    summary = capsys.readouterr().out
    assert "val split" in summary and "first 1,025 tokens" in summary and "--val-tokens" in summary
