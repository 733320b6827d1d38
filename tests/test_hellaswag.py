"""HellaSwag: loading and validation, batched scoring against a one-at-a-time reference, DDP."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from minigpt.evals import hellaswag
from minigpt.evals.hellaswag import HellaSwagError, evaluate, load_examples, score_examples
from minigpt.model import GPT, GPT2_VOCAB_SIZE
from minigpt.tokenizer import get_tokenizer

from conftest import tiny_config

WORDS = (
    "a man is sitting on roof he starts pulling up roofing the woman takes a brush and paints "
    "fence children play in the park while dog runs after ball then they all go home quickly "
    "she is holding rubik's cube someone slices tomato knife kitchen counter, camera pans away."
).split()


def official_rows(n: int, seed: int = 0, long_every: int = 7) -> list[dict]:
    """Rows in the official hellaswag_val.jsonl schema, of varied lengths (some very long)."""
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = []
    for i in range(n):
        long = i % long_every == long_every - 1
        ctx_a = sentence(30, 60) if long else sentence(3, 15)
        ctx_b = rng.choice(WORDS)
        rows.append(
            {
                "ind": 1000 + i,
                "activity_label": "Fixture",
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}",
                "endings": [sentence(1, 12) for _ in range(4)],
                "source_id": f"fixture~{i}",
                "split": "val",
                "split_type": "indomain",
                "label": rng.randrange(4),
            }
        )
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def fixture_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    write_jsonl(path, official_rows(16))
    return path


def reference_predictions(logits_fn, examples, block_size):
    """build-nanogpt's evaluation, one example (four context + ending rows) per forward."""
    tok = get_tokenizer()
    out = []
    for ex in examples:
        ends = [tok.encode(" " + e)[: block_size - 1] for e in ex.endings]
        ctx = tok.encode(ex.ctx)[-(block_size - max(map(len, ends))) :]
        width = max(len(ctx) + len(e) for e in ends)
        tokens = torch.zeros(4, width, dtype=torch.long)
        mask = torch.zeros(4, width)
        for i, e in enumerate(ends):
            tokens[i, : len(ctx) + len(e)] = torch.tensor(ctx + e)
            mask[i, len(ctx) : len(ctx) + len(e)] = 1
        with torch.no_grad():
            logits = logits_fn(tokens)[..., :GPT2_VOCAB_SIZE].float()
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none"
        ).view(4, -1)
        sum_loss = (losses * mask[:, 1:]).sum(1)
        mean_loss = sum_loss / mask[:, 1:].sum(1)
        out.append((int(sum_loss.argmin()), int(mean_loss.argmin()), (-sum_loss).tolist()))
    return out


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config()).eval()


def tiny_transformers_model(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def assert_matches_reference(predictions, reference):
    assert [p.pred for p in predictions] == [r[0] for r in reference]
    assert [p.pred_norm for p in predictions] == [r[1] for r in reference]
    for p, r in zip(predictions, reference, strict=True):
        assert p.logprobs == pytest.approx(r[2], abs=1e-3)


def test_minigpt_matches_one_at_a_time_reference(fixture_file):
    examples = load_examples(fixture_file)
    model = tiny_gpt()
    predictions = score_examples(model, examples, "cpu", batch_size=8)
    reference = reference_predictions(lambda t: model(t)[0], examples, model.config.block_size)
    assert_matches_reference(predictions, reference)
    labels = [ex.label for ex in examples]
    metrics = evaluate(model, examples, "cpu", batch_size=8)
    assert metrics["n"] == len(examples)
    assert metrics["acc"] == sum(r[0] == y for r, y in zip(reference, labels, strict=True)) / 16
    assert (
        metrics["acc_norm"] == sum(r[1] == y for r, y in zip(reference, labels, strict=True)) / 16
    )
    assert metrics["examples_per_sec"] > 0


def test_transformers_model_matches_reference(fixture_file):
    examples = load_examples(fixture_file)
    model = tiny_transformers_model()
    predictions = score_examples(model, examples, "cpu", batch_size=8)
    reference = reference_predictions(lambda t: model(t).logits, examples, 64)
    assert_matches_reference(predictions, reference)


def test_batch_size_does_not_change_scores(fixture_file):
    examples = load_examples(fixture_file)
    model = tiny_gpt(seed=1)
    one = score_examples(model, examples, "cpu", batch_size=1)
    many = score_examples(model, examples, "cpu", batch_size=16)
    assert [(p.pred, p.pred_norm) for p in one] == [(p.pred, p.pred_norm) for p in many]
    for a, b in zip(one, many, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.lengths == b.lengths


def test_limit_and_training_mode_restored(fixture_file):
    model = tiny_gpt().train()
    metrics = evaluate(model, load_examples(fixture_file), "cpu", batch_size=4, limit=5)
    assert metrics["n"] == 5
    assert model.training
    assert len(load_examples(fixture_file, limit=3)) == 3


def test_arrow_with_string_labels_equals_jsonl(tmp_path, fixture_file):
    pa = pytest.importorskip("pyarrow")
    rows = [{**r, "label": str(r["label"])} for r in official_rows(16)]
    path = tmp_path / "data-00000-of-00001.arrow"
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert load_examples(path) == load_examples(fixture_file)
    assert load_examples(tmp_path) == load_examples(fixture_file)  # a save_to_disk directory


@pytest.mark.parametrize(
    "change, message",
    [
        ({"label": 4}, "label 4 is not an ending index 0..3"),
        ({"label": "x"}, "label 'x'"),
        ({"endings": "not a list"}, "endings must be a list"),
        ({"ctx": None}, "ctx must be a non-empty string"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, change, message):
    rows = official_rows(3)
    rows[1].update(change)
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows)
    with pytest.raises(HellaSwagError, match=rf"bad.jsonl: row 2: {message}"):
        load_examples(path)


def test_wrong_schema_and_missing_file(tmp_path):
    path = tmp_path / "other.jsonl"
    write_jsonl(path, [{"question": "q", "answer": "a"}])
    with pytest.raises(HellaSwagError, match=r"other.jsonl: row 1: missing field"):
        load_examples(path)
    with pytest.raises(HellaSwagError, match="no such file"):
        load_examples(tmp_path / "absent.jsonl")
    path.write_text("{not json\n")
    with pytest.raises(HellaSwagError, match="line 1 is not JSON"):
        load_examples(path)


def _ddp_worker(rank: int, world: int, init_file: str, data: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        metrics = evaluate(tiny_gpt(), load_examples(data), "cpu", batch_size=4)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(metrics, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_give_single_process_totals(tmp_path, fixture_file):
    out = tmp_path / "ddp.json"
    torch.multiprocessing.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "rendezvous"), str(fixture_file), str(out)),
        nprocs=2,
    )
    ddp = json.loads(out.read_text())
    single = evaluate(tiny_gpt(), load_examples(fixture_file), "cpu", batch_size=4)
    assert (ddp["n"], ddp["acc"], ddp["acc_norm"]) == (
        single["n"],
        single["acc"],
        single["acc_norm"],
    )


def test_hub_source_error_is_clear(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HellaSwagError, match="could not load Rowan/hellaswag"):
        hellaswag.load_examples("Rowan/hellaswag")


def test_default_source_is_the_official_file_downloaded_once(tmp_path, monkeypatch):
    downloads = []

    def fake_urlretrieve(url, target):
        downloads.append(url)
        write_jsonl(target, official_rows(3))

    monkeypatch.setattr(hellaswag, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(hellaswag.urllib.request, "urlretrieve", fake_urlretrieve)
    first = load_examples()
    assert load_examples() == first and len(first) == 3
    assert downloads == [hellaswag.OFFICIAL_URL]
    assert (tmp_path / "cache" / "hellaswag_val.jsonl").is_file()
