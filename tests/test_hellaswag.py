"""HellaSwag: lm-eval's format, loading and validation, DDP scoring and fetching under torchrun.

Scores against a one-example-at-a-time reference for every task live in test_evals_tasks.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from minigpt.errors import MinigptError
from minigpt.evals import hellaswag
from minigpt.evals.data import EvalDataError
from minigpt.evals.hellaswag import evaluate, load, load_examples
from minigpt.model import GPT
from minigpt.train.distributed import DistContext
from minigpt.train.pretrain import tasks_hook

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


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config()).eval()


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
        ({"label": 4}, "answer 4 is not a choice index 0..3"),
        ({"label": "x"}, "answer 'x'"),
        ({"endings": "not a list"}, "endings must be a list"),
        ({"ctx_a": None}, "unsupported operand"),
    ],
)
def test_bad_rows_are_counted_and_the_first_named(tmp_path, change, message):
    rows = official_rows(3)
    rows[1].update(change)
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows)
    loaded = load(path)
    assert len(loaded.examples) == 2 and loaded.skipped == 1
    assert loaded.problem.startswith(f"{path}: row 2: ") and message in loaded.problem


def test_format_is_lm_evals(tmp_path):
    row = {**official_rows(1)[0], "activity_label": "Making a cake", "ctx_a": "A woman mixes.",
           "ctx_b": "she", "endings": ["pours it [title] Bake.", "a  b", "x [step] y", "z"]}  # fmt: skip
    path = tmp_path / "one.jsonl"
    write_jsonl(path, [row])
    (example,) = load_examples(path)
    assert example.contexts[0] == "Making a cake: A woman mixes. She"
    assert example.continuations == (" pours it. Bake.", " a b", " x y", " z")
    assert example.lengths == (15, 3, 3, 1)


def test_wrong_schema_and_missing_file(tmp_path):
    path = tmp_path / "other.jsonl"
    write_jsonl(path, [{"question": "q", "answer": "a"}])
    with pytest.raises(EvalDataError, match=r"no usable examples .*row 1: missing field 'label'"):
        load_examples(path)
    with pytest.raises(EvalDataError, match="no such file"):
        load_examples(tmp_path / "absent.jsonl")
    path.write_text("{not json\n")
    with pytest.raises(EvalDataError, match="line 1 is not JSON"):
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
    with pytest.raises(EvalDataError, match="could not load Rowan/hellaswag"):
        hellaswag.load_examples("Rowan/hellaswag")


def test_default_source_is_the_official_file_downloaded_once(tmp_path, monkeypatch):
    downloads = []

    def fake_urlretrieve(url, target):
        downloads.append(url)
        write_jsonl(Path(target), official_rows(3))

    monkeypatch.setattr(hellaswag, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setenv("MINIGPT_EVAL_DATA", str(tmp_path / "no-offline-copy"))
    monkeypatch.setattr(hellaswag.urllib.request, "urlretrieve", fake_urlretrieve)
    first = load_examples()
    assert load_examples() == first and len(first) == 3
    assert downloads == [hellaswag.OFFICIAL_URL]
    assert (tmp_path / "cache" / "hellaswag_val.jsonl").is_file()


def _fetch_worker(rank: int, world: int, init_file: str, source: str, cache: str, out: str):
    """One torchrun-like process: the training hook's setup with a counted download."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    calls = []
    real = hellaswag.urllib.request.urlretrieve
    hellaswag.urllib.request.urlretrieve = lambda *a: (calls.append(a[0]), real(*a))[1]
    hellaswag.CACHE_DIR = hellaswag.Path(cache)
    from minigpt.config import EvalSection, TaskSchedule

    section = EvalSection(task={"hellaswag": TaskSchedule(every=1, data=source)})
    try:
        hook = tasks_hook(section, dist=DistContext(rank, rank, world))
        result = {"calls": calls, "metrics": hook.fn(0, tiny_gpt())}
    except MinigptError as e:
        result = {"calls": calls, "error": str(e)}
    finally:
        torch.distributed.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


def _spawn_fetch(tmp_path, source: str) -> list[dict]:
    out = tmp_path / "result"
    torch.multiprocessing.spawn(
        _fetch_worker,
        args=(2, str(tmp_path / "rendezvous"), source, str(tmp_path / "cache"), str(out)),
        nprocs=2,
    )
    return [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2)]


def test_under_torchrun_local_rank_zero_fetches_and_the_others_wait(tmp_path, fixture_file):
    source = f"file://{fixture_file}"
    results = _spawn_fetch(tmp_path, source)
    assert results[0]["calls"] == [source] and results[1]["calls"] == []
    assert results[0]["metrics"] == results[1]["metrics"]
    expected = evaluate(tiny_gpt(), load_examples(fixture_file), "cpu")
    assert results[0]["metrics"]["hellaswag_acc_norm"] == expected["acc_norm"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["hellaswag_val.jsonl"]


def test_without_network_every_rank_gets_one_clear_error(tmp_path):
    results = _spawn_fetch(tmp_path, "http://127.0.0.1:9/hellaswag_val.jsonl")
    for result in results:
        assert "could not download http://127.0.0.1:9/hellaswag_val.jsonl" in result["error"]
        assert "eval.hellaswag_data" in result["error"]
    assert not list((tmp_path / "cache").glob("*.part"))  # no half-written file left behind
