import json

import numpy as np
import pytest

from minigpt.data.shards import (
    HEADER_BYTES,
    MAGIC,
    ShardError,
    TokenShardWriter,
    list_shards,
    read_manifest,
    read_shard,
    write_manifest,
    write_shard,
)


def test_round_trip_and_header_layout(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 42], dtype=np.uint16)
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    read = read_shard(path)
    assert isinstance(read, np.memmap) and read.dtype == np.uint16
    assert read.tolist() == tokens.tolist()
    assert not list(tmp_path.glob("*.tmp"))


def test_write_refuses_ids_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "a.bin", np.array([70000]))


def corrupt(path, offset, value):
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))


def test_bad_magic_version_and_truncation_name_the_file(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100))
    corrupt(path, 0, 123)
    with pytest.raises(ShardError, match=r"s\.bin: bad magic number 123"):
        read_shard(path)
    write_shard(path, np.arange(100))
    corrupt(path, 4, 7)
    with pytest.raises(ShardError, match=r"s\.bin: shard version 7"):
        read_shard(path)
    write_shard(path, np.arange(100))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"s\.bin: header says 100 tokens .*truncated"):
        read_shard(path)
    path.write_bytes(b"short")
    with pytest.raises(ShardError, match="shorter than the 1024-byte shard header"):
        read_shard(path)
    with pytest.raises(ShardError, match="no such shard file"):
        read_shard(tmp_path / "missing.bin")
    assert MAGIC == 20240520


def test_reads_build_nanogpt_npy_shards(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    np.save(tmp_path / "edufineweb_val_000000.npy", tokens)
    np.save(tmp_path / "edufineweb_train_000001.npy", tokens[::-1].copy())
    assert read_shard(tmp_path / "edufineweb_val_000000.npy").tolist() == tokens.tolist()
    assert [p.name for p in list_shards(tmp_path, "train")] == ["edufineweb_train_000001.npy"]
    np.save(tmp_path / "bad_val_000001.npy", np.zeros((2, 2), dtype=np.uint16))
    with pytest.raises(ShardError, match="expected a 1-D integer array"):
        read_shard(tmp_path / "bad_val_000001.npy")


def test_writer_splits_val_then_train_and_straddles_shards(tmp_path):
    writer = TokenShardWriter(tmp_path, "d", shard_tokens=10, val_tokens=15)
    stream = np.arange(47, dtype=np.uint16)
    for chunk in np.split(stream, [3, 4, 20, 33]):  # uneven document sizes
        writer.add(chunk)
    shards = writer.close()
    assert [(s["file"], s["tokens"]) for s in shards] == [
        ("d_val_000000.bin", 10),
        ("d_val_000001.bin", 5),
        ("d_train_000000.bin", 10),
        ("d_train_000001.bin", 10),
        ("d_train_000002.bin", 10),
        ("d_train_000003.bin", 2),
    ]
    joined = np.concatenate([read_shard(tmp_path / s["file"]) for s in shards])
    assert joined.tolist() == stream.tolist()
    write_manifest(tmp_path, {"shards": shards})
    assert [p.name for p in list_shards(tmp_path, "val")] == [
        "d_val_000000.bin",
        "d_val_000001.bin",
    ]
    assert json.loads((tmp_path / "manifest.json").read_text())["format"] == "minigpt-shards/1"


def test_manifest_and_directory_errors(tmp_path):
    assert read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(ShardError, match="no such dataset directory"):
        list_shards(tmp_path / "nope", "train")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no 'train' shards"):
        list_shards(tmp_path, "train")
    with pytest.raises(ShardError, match=r"prepare \.\.\. --overwrite` \(and --val-tokens of at"):
        list_shards(tmp_path, "val")  # a dataset without a val split says how to get one
