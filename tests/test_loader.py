"""TokenLoader and ValidationSet: windows of real shard tokens, seeded, resumable, rank-sliced."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from minigpt.data.shards import ShardError, TokenLoader, ValidationSet, write_shard

SEQ, MICRO = 8, 3


@pytest.fixture
def dataset(tmp_path):
    """Three train shards of distinct sizes whose tokens are their own positions (plus an
    offset per shard), so every window shows exactly where it came from; one val shard."""
    for i, n in enumerate([101, 67, 150]):
        write_shard(tmp_path / f"t_train_{i:06d}.bin", np.arange(n) + 1000 * (i + 1))
    write_shard(tmp_path / "t_val_000000.bin", np.arange(60))
    return tmp_path


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_windows_are_contiguous_shard_slices_shifted_by_one(dataset):
    x, y = TokenLoader(dataset, "train", MICRO, SEQ, seed=0).next_batch()
    assert x.shape == y.shape == (MICRO, SEQ) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive positions of one shard
    assert (x // 1000 == x[:, :1] // 1000).all()  # no window straddles two shards


def test_one_epoch_visits_each_window_once_then_reshuffles(dataset):
    loader = TokenLoader(dataset, "train", 1, SEQ, seed=3)
    per_epoch = sum(
        (n - 1) // SEQ for n in [101, 67, 150]
    )  # with offset 0; at most 1 fewer per shard
    starts, epochs = {0: [], 1: []}, []
    while loader.epoch < 2:
        epoch = loader.epoch
        x, _ = loader.next_batch()
        starts[epoch].append(int(x[0, 0]))
        epochs.append(epoch)
    for epoch in (0, 1):
        assert len(set(starts[epoch])) == len(starts[epoch]) <= per_epoch  # no repeats
        assert len(starts[epoch]) >= per_epoch - 3  # at most one window lost per shard offset
    assert starts[0] != starts[1]  # a new order (and offsets) every epoch
    shard_order = [list(dict.fromkeys(s // 1000 for s in starts[e])) for e in (0, 1)]
    assert sorted(shard_order[0]) == [1, 2, 3]


def test_same_seed_same_stream_other_seed_other_stream(dataset):
    a = batches(TokenLoader(dataset, "train", MICRO, SEQ, seed=7), 5)
    b = batches(TokenLoader(dataset, "train", MICRO, SEQ, seed=7), 5)
    c = batches(TokenLoader(dataset, "train", MICRO, SEQ, seed=8), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))


def test_state_survives_a_weights_only_round_trip_and_resumes_exactly(dataset):
    original = TokenLoader(dataset, "train", MICRO, SEQ, seed=1)
    batches(original, 17)  # past the first shard boundary
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = TokenLoader(dataset, "train", MICRO, SEQ, seed=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for (xa, ya), (xb, yb) in zip(batches(original, 40), batches(restored, 40), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_resuming_with_another_seed_is_an_error(dataset):
    state = TokenLoader(dataset, "train", MICRO, SEQ, seed=1).state_dict()
    with pytest.raises(ShardError, match="seed"):
        TokenLoader(dataset, "train", MICRO, SEQ, seed=2).load_state_dict(state)


def test_ranks_read_disjoint_slices_of_the_single_process_stream(dataset):
    single = batches(TokenLoader(dataset, "train", MICRO, SEQ, seed=5), 8)
    ranks = [batches(TokenLoader(dataset, "train", MICRO, SEQ, 5, r, 2), 4) for r in (0, 1)]
    for step in range(4):
        assert torch.equal(ranks[0][step][0], single[2 * step][0])
        assert torch.equal(ranks[1][step][0], single[2 * step + 1][0])


def test_validation_set_is_fixed_and_split_over_ranks(dataset):
    val = ValidationSet(dataset, SEQ, max_tokens=40, micro_batch=2)
    rows = torch.cat([x for x, _ in val.batches()])
    assert val.num_tokens == 40
    assert torch.equal(rows, torch.arange(40).view(5, SEQ))  # the first 40 tokens, in order
    again = torch.cat([x for x, _ in val.batches()])
    assert torch.equal(rows, again)
    parts = [
        torch.cat([x for x, _ in ValidationSet(dataset, SEQ, 40, 2, r, 2).batches()])
        for r in (0, 1)
    ]
    assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, rows.tolist()))


def test_too_little_data_is_a_clear_error(dataset):
    with pytest.raises(ShardError, match="shorter than one window"):
        TokenLoader(dataset, "train", 1, 500, seed=0)
    with pytest.raises(ShardError, match="fewer than one window"):
        ValidationSet(dataset, 100, 1000, 1)
