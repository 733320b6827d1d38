import json
import subprocess
import sys

import numpy as np
import pytest

from minigpt.cli import main as cli_main
from minigpt.data import prepare
from minigpt.data.shards import ShardError, list_shards, read_manifest, read_shard
from minigpt.errors import MinigptError
from minigpt.tokenizer import get_tokenizer

from conftest import SRC

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text, emoji 🦙, and <|endoftext|> typed by a user.",
    "  whitespace   runs\n\n\tand tabs  ",
    "Short.",
    "A somewhat longer document. " * 40,
]


def expected_stream(docs):
    """Reference: every document as EOT + its plain GPT-2 tokens, in order."""
    tok = get_tokenizer()
    out = []
    for doc in docs:
        out += [tok.eot_id] + tok.encode(doc)
    return out


def all_tokens(directory):
    manifest = read_manifest(directory)
    return np.concatenate([read_shard(directory / s["file"]) for s in manifest["shards"]]).tolist()


def run(*args):
    return cli_main(["prepare", *map(str, args)])


def test_txt_files_one_document_each(tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    out = tmp_path / "out"
    assert run("files", str(tmp_path / "doc*.txt"), "--out", out, "--shard-tokens", 64) == 0
    manifest = read_manifest(out)
    stream = expected_stream(DOCS)
    assert all_tokens(out) == stream
    assert manifest["documents"] == len(DOCS)
    assert manifest["tokens"]["total"] == sum(len(get_tokenizer().encode(d)) for d in DOCS) + 5
    assert manifest["tokens"]["val"] == 64  # default: the whole first shard is validation
    assert manifest["tokens"]["train"] == len(stream) - 64
    assert all(s["tokens"] <= 64 for s in manifest["shards"])
    assert manifest["tokenizer"]["ranks_sha256"].startswith("306cd27f")


def test_jsonl_and_parquet_with_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS[:3]))
    )
    pq.write_table(pa.table({"body": DOCS[3:], "n": [1, 2]}), tmp_path / "b.parquet")
    out = tmp_path / "out"
    args = ["files", jsonl, tmp_path / "b.parquet", "--text-field", "body", "--out", out]
    assert run(*args, "--val-tokens", 10, "--shard-tokens", 1000) == 0
    assert all_tokens(out) == expected_stream(DOCS)
    manifest = read_manifest(out)
    assert manifest["tokens"]["val"] == 10
    assert [s["split"] for s in manifest["shards"]] == ["val", "train"]


@pytest.mark.parametrize("shape", ["small-txt", "big-txt", "jsonl", "parquet"])
def test_every_bench_corpus_shape_gives_exact_tokens(shape, tmp_path, monkeypatch):
    """The shapes of bench/prepare_throughput.py, scaled down, with batches small enough that
    batching, the several-documents-per-batch rule and the even split across threads all run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(prepare, "BATCH_CHARS", 3000)
    rng = np.random.default_rng(0)
    pieces = DOCS + [f"Document {i}: " + "word " * int(rng.integers(1, 300)) for i in range(30)]
    if shape == "big-txt":  # fewer documents than workers per batch, each above BATCH_CHARS
        docs = [" ".join(pieces[i::3]) * 3 for i in range(3)]
    else:
        docs = pieces
    files = []
    if shape.endswith("txt"):
        for i, doc in enumerate(docs):
            files.append(tmp_path / f"doc{i:03d}.txt")
            files[-1].write_text(doc, encoding="utf-8")
    else:
        for part in range(2):
            files.append(tmp_path / f"part{part}.{shape}")
            chunk = docs[part::2]
            if shape == "jsonl":
                files[-1].write_text("".join(json.dumps({"text": d}) + "\n" for d in chunk))
            else:
                pq.write_table(pa.table({"text": chunk}), files[-1])
        docs = docs[0::2] + docs[1::2]
    out = tmp_path / "out"
    assert run("files", *files, "--out", out, "--val-tokens", 50, "--workers", 4) == 0
    assert all_tokens(out) == expected_stream(docs)


def test_documents_to_tokens_matches_one_document_at_a_time():
    """Chunks are encoded in one call with EOT between documents; the chat tokens' strings,
    empty documents and (through the per-document fallback) typed EOT text stay plain text."""
    tok = get_tokenizer()
    docs = ["a <|USER|> b<|END|>", "", "x\n", "<|ASSISTANT|>", " lead space", "end"]
    assert prepare.documents_to_tokens(docs, tok).tolist() == expected_stream(docs)
    with_eot = [*docs, "typed <|endoftext|> here"]
    assert prepare.documents_to_tokens(with_eot, tok).tolist() == expected_stream(with_eot)
    assert prepare.documents_to_tokens([], tok).size == 0


def test_split_evenly_balances_characters_and_keeps_order():
    batch = ["a" * 10, "b", "c", "d" * 10]
    assert prepare.split_evenly(batch, 4) == [["a" * 10, "b"], ["c"], ["d" * 10]]
    assert prepare.split_evenly(["x"] * 10, 3) == [["x"] * 3, ["x"] * 3, ["x"] * 4]
    assert prepare.split_evenly(["only"], 16) == [["only"]]


def test_saved_datasets_dataset_and_fineweb_loader(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS, "score": [1.0] * 5}).save_to_disk(saved)
    assert run("hf", saved, "--out", tmp_path / "a", "--val-tokens", 8) == 0
    assert all_tokens(tmp_path / "a") == expected_stream(DOCS)

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.load_from_disk(saved).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(prepare, "check_hub_reachable", lambda: None)  # the fake hub is here
    assert run("fineweb-edu", "--out", tmp_path / "fw", "--val-tokens", 8, "--limit-docs", 3) == 0
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert all_tokens(tmp_path / "fw") == expected_stream(DOCS[:3])
    assert read_manifest(tmp_path / "fw")["source"]["dataset"] == "HuggingFaceFW/fineweb-edu"


def test_builtin_corpus_counts(tmp_path):
    out = tmp_path / "b"
    assert run("builtin", "--out", out) == 0
    manifest = read_manifest(out)
    docs = list(prepare.builtin_documents())
    assert manifest["documents"] == len(docs) == 42
    assert (
        manifest["tokens"]["total"]
        == sum(len(ids) for ids in get_tokenizer().encode_batch(docs)) + 42
    )
    assert manifest["tokens"]["val"] == 128_000
    assert read_shard(list_shards(out, "train")[0])[:1].tolist() != []


def test_rerun_is_a_noop_and_different_source_is_refused(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello there")
    (tmp_path / "b.txt").write_text("general kenobi")
    out = tmp_path / "out"
    assert (
        run("files", tmp_path / "a.txt", tmp_path / "b.txt", "--out", out, "--val-tokens", 2) == 0
    )
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert (
        run("files", tmp_path / "a.txt", tmp_path / "b.txt", "--out", out, "--val-tokens", 2) == 0
    )
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert run("files", tmp_path / "a.txt", "--out", out, "--val-tokens", 2) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert run("files", tmp_path / "a.txt", "--out", out, "--val-tokens", 1, "--overwrite") == 0
    assert read_manifest(out)["documents"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "files_train_000000.bin",
        "files_val_000000.bin",
        "manifest.json",
    ]


def test_other_tokenizer_directory_is_refused(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello there")
    out = tmp_path / "out"
    assert run("files", tmp_path / "a.txt", "--out", out, "--val-tokens", 1) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"]["name"] = "llama"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run("files", tmp_path / "a.txt", "--out", out, "--val-tokens", 1) == 2
    assert "different tokenizer" in capsys.readouterr().err


def test_interrupted_run_leaves_only_whole_shards_and_restarts(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_CHARS", 2000)  # many small batches before the failure

    def failing_docs():
        for i in range(200):
            if i == 150:
                raise RuntimeError("disk on fire")
            yield f"document number {i} " * 20

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare.prepare_dataset(
            out,
            "t",
            {"kind": "test"},
            failing_docs(),
            shard_tokens=500,
            val_tokens=500,
            progress=False,
        )
    leftovers = sorted(out.iterdir())
    assert leftovers and all(p.suffix == ".bin" for p in leftovers)  # no .tmp, no manifest
    for path in leftovers:
        assert read_shard(path).size == 500  # each one whole
    docs = [f"document number {i} " * 20 for i in range(200)]
    manifest = prepare.prepare_dataset(
        out, "t", {"kind": "test"}, docs, shard_tokens=500, val_tokens=500, progress=False
    )
    assert all_tokens(out) == expected_stream(docs)
    assert manifest["documents"] == 200


def test_bad_jsonl_stops_with_file_and_line_or_is_skipped(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "fine"}\n{"text": broken\n{"title": "no text"}\n{"text": 5}\n{"text": "ok"}\n'
    )
    assert run("files", bad, "--out", tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: not valid JSON" in err and "--on-error skip" in err
    assert run("files", bad, "--out", tmp_path / "o2", "--on-error", "skip", "--val-tokens", 1) == 0
    manifest = read_manifest(tmp_path / "o2")
    assert manifest["skipped_records"] == 3 and manifest["documents"] == 2
    assert any("bad.jsonl:3: no 'text' field (fields: title)" in e for e in manifest["errors"])
    assert all_tokens(tmp_path / "o2") == expected_stream(["fine", "ok"])


def test_missing_inputs_and_fields(tmp_path, capsys):
    assert run("files", tmp_path / "nothing*.txt", "--out", tmp_path / "o") == 2
    assert "matches no files" in capsys.readouterr().err
    assert run("files", tmp_path / "missing.txt", "--out", tmp_path / "o") == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert run("files", tmp_path / "empty.txt", "--out", tmp_path / "o") == 2
    assert "file is empty" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("a,b")
    assert run("files", tmp_path / "x.csv", "--out", tmp_path / "o") == 2
    assert "unsupported file type '.csv'" in capsys.readouterr().err
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    assert run("files", tmp_path / "p.parquet", "--out", tmp_path / "o") == 2
    assert "no 'text' column (columns: content)" in capsys.readouterr().err


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café crème, naïve".encode("latin-1") + b"\xff\xfe ok")
    out = tmp_path / "o"
    assert run("files", tmp_path / "latin1.txt", "--out", out, "--val-tokens", 1) == 0
    manifest = read_manifest(out)
    assert manifest["undecodable_bytes"] == 5  # é, è, ï, then 0xff 0xfe
    expected = "caf\ufffd cr\ufffdme, na\ufffdve\ufffd\ufffd ok"
    assert all_tokens(out) == expected_stream([expected])


def test_jsonl_records_the_fast_parser_refuses_are_read_as_json_reads_them(tmp_path):
    """orjson rejects invalid UTF-8, lone surrogate escapes and NaN; json (the reference)
    accepts them after replacement, so those records must come out exactly as json reads them."""
    lines = [
        b'{"text": "caf\xe9 ok"}',  # latin-1 byte: U+FFFD, counted
        b'{"text": "half \\ud800 pair"}',  # a lone surrogate escape
        b'{"text": "nan field", "score": NaN}',
        b'{"text": "plain \\u00e9\\ud83e\\udd99"}',  # the fast path
        b'["not", "an", "object"]',  # skipped and counted
        b'{"body": "no text field"}',  # skipped and counted
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "o"
    assert (
        run("files", tmp_path / "a.jsonl", "--out", out, "--val-tokens", 1, "--on-error", "skip")
        == 0
    )
    manifest = read_manifest(out)
    assert manifest["undecodable_bytes"] == 1
    assert manifest["skipped_records"] == 2
    expected = [json.loads(line.decode("utf-8", "replace"))["text"] for line in lines[:4]]
    assert all_tokens(out) == expected_stream(expected)


def test_too_small_corpus_for_validation_split(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("tiny")
    assert run("files", tmp_path / "a.txt", "--out", tmp_path / "o") == 2
    assert "pass a smaller --val-tokens" in capsys.readouterr().err
    with pytest.raises(ShardError):
        list_shards(tmp_path / "o", "train")
    with pytest.raises(MinigptError):
        prepare.expand_patterns([str(tmp_path / "zzz*.jsonl")])


def test_cli_help_and_prepare_do_not_import_torch(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 50)
    script = (
        "import sys\n"
        "from minigpt.cli import main\n"
        f"assert main(['prepare', 'files', {str(tmp_path / 'a.txt')!r}, '--out', "
        f"{str(tmp_path / 'o')!r}, '--val-tokens', '10']) == 0\n"
        "assert 'torch' not in sys.modules, 'prepare imported torch'\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, '--help imported torch'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)}
    )
    assert result.returncode == 0, result.stderr


def test_console_entry_point_runs(cli, tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    result = cli("prepare", "files", tmp_path / "a.txt", "--out", tmp_path / "o", "--val-tokens", 1)
    assert "documents 1" in result.stdout
    bad = cli("prepare", "files", tmp_path / "none.txt", "--out", tmp_path / "o2", check=False)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_val_tokens_zero_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world, " * 50)
    assert run("files", tmp_path / "a.txt", "--out", tmp_path / "o", "--val-tokens", 0) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "minigpt prepare: error: --val-tokens 0: train and eval loss need a validation split; "
        "pass at least 1 token, or leave it out for one shard"
    )
    assert not (tmp_path / "o").exists()


def test_a_failed_prepare_removes_the_out_directory_it_made(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("tiny")  # too small for a train split: fails after writing
    assert run("files", tmp_path / "a.txt", "--out", tmp_path / "new" / "o") == 2
    assert "pass a smaller --val-tokens" in capsys.readouterr().err
    assert not (tmp_path / "new" / "o").exists()
    (tmp_path / "mine").mkdir()  # a directory the user made stays
    assert run("files", tmp_path / "a.txt", "--out", tmp_path / "mine") == 2
    assert (tmp_path / "mine").is_dir()


@pytest.mark.parametrize("name", ["./my_saved_dataset", "~/no_such_minigpt_dir", "data/mine"])
def test_hf_with_a_missing_directory_says_no_such_directory(name, tmp_path, monkeypatch, capsys):
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert run("hf", name, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert f"error: {name}: no such directory; pass a directory written by save_to_disk" in err
    assert not (tmp_path / "o").exists()


def test_hf_fails_at_once_when_the_hub_cannot_be_reached(tmp_path, monkeypatch, capsys):
    import time

    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    assert run("hf", "someone/some-dataset", "--out", tmp_path / "o") == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "cannot reach the Hugging Face hub at http://127.0.0.1:9" in err
    assert "HF_HUB_OFFLINE=1" in err and not (tmp_path / "o").exists()


def test_hf_hub_offline_skips_the_probe(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepare.check_hub_reachable()  # the local cache alone is read: no error here
