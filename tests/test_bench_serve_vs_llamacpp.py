"""bench/serve_vs_llamacpp.py without llama.cpp: its options, prompts, summary and goals, and the
llama-server build's cache hit and its error when cmake is missing (nothing is compiled)."""

from __future__ import annotations

import importlib.util
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = REPO / "bench" / "serve_vs_llamacpp.py"
    sys.path.insert(0, str(path.parent))  # its sibling stream_client, as `python bench/...` has
    spec = importlib.util.spec_from_file_location("serve_vs_llamacpp", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_vs_llamacpp"] = module
    spec.loader.exec_module(module)
    return module


def test_options(bench):
    args = bench.parse_args([])
    assert args.clients == [1, 4, 16, 32] and args.tokens == 32 and args.rounds == 3
    assert args.precisions == ["float32", "int8"]
    quick = bench.parse_args(["--quick"])
    assert quick.clients == [1, 4] and quick.rounds == 1 and quick.precisions == ["float32"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--clients", "0"])


def test_prompts_differ_from_their_first_token(bench):
    prompts = bench.level_prompts(16)
    assert len(prompts) == 32
    assert len({p.split()[0] for p in prompts}) == 32  # no shared prefix to cache
    assert len(bench.level_prompts(1)) == 8


def level(tokens_per_sec: float, ttft: list[float]) -> dict:
    return {"tokens_per_sec": tokens_per_sec, "ttft": ttft, "short": 0}


def test_summary_and_goals(bench):
    runs = {
        ("float32", 1, "minigpt"): [level(20, [0.1, 0.2]), level(24, [0.1, 0.3])],
        ("float32", 1, "llama"): [level(40, [0.1, 0.1]), level(40, [0.1, 0.1])],
        ("float32", 16, "minigpt"): [level(300, [0.4, 0.5])],
        ("float32", 16, "llama"): [level(250, [0.2, 0.3])],
    }
    rows = bench.summarize(runs, ["float32"], [1, 16], 32)
    one, sixteen = rows
    assert one["precision"] == "float32 vs f32"
    assert one["minigpt"]["tokens_per_sec"] == 22 and one["tokens_per_sec_ratio"] == 0.55
    assert sixteen["tokens_per_sec_ratio"] == 1.2 and sixteen["ttft_p50_ratio"] == 1.8
    goals = {(g["clients"], g["goal"]): g["met"] for g in bench.goals(rows)}
    assert goals == {
        (1, "tokens/s ratio >= 0.8"): False,
        (16, "tokens/s ratio >= 1.0"): True,
        (16, "ttft p50 ratio <= 1.5"): False,
    }
    bench.print_table(rows)


def test_a_ratio_just_under_a_goal_does_not_round_up_to_it(bench):
    """96.3 / 120.5 = 0.7992: at two decimals it would read 0.80 and pass the 0.8 goal."""
    runs = {
        ("int8", 1, "minigpt"): [level(96.3, [0.05])],
        ("int8", 1, "llama"): [level(120.5, [0.06])],
    }
    (row,) = bench.summarize(runs, ["int8"], [1], 32)
    assert row["tokens_per_sec_ratio"] == 0.799
    assert [g["met"] for g in bench.goals([row])] == [False]


def test_build_reuses_the_cached_binary(bench, tmp_path, monkeypatch):
    binary = tmp_path / "llama.cpp-9.9.9" / "build" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    monkeypatch.setattr(bench, "CACHE", tmp_path)
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("built again"))
    assert bench.build_llama_server("9.9.9") == binary


def test_build_without_cmake_says_so(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CACHE", tmp_path)
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="cmake and a C\\+\\+ compiler"):
        bench.build_llama_server("9.9.9")


def test_unpack_takes_the_vendored_tree_and_its_commit(bench, tmp_path):
    top = tmp_path / "llama_cpp_python-9.9.9"
    (top / "vendor" / "llama.cpp" / "ggml").mkdir(parents=True)
    (top / "vendor" / "llama.cpp" / "CMakeLists.txt").write_text("project(llama)\n")
    (top / "vendor" / "llama.cpp" / "ggml" / "x.c").write_text("")
    (top / "llama_cpp").mkdir()
    (top / "CHANGELOG.md").write_text(
        "## [Unreleased]\n\n## [9.9.9]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n"
        "\n## [9.9.8]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f\n"
    )
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(top, arcname=top.name)
    root = tmp_path / "cache"
    bench.unpack_vendored_llama_cpp(sdist, root)
    assert (root / "llama.cpp" / "CMakeLists.txt").read_text() == "project(llama)\n"
    assert (root / "llama.cpp" / "ggml" / "x.c").exists()
    assert not (root / "llama.cpp" / "llama_cpp").exists()
    assert (root / "commit.txt").read_text() == "0c1e57098\n"
    binary = root / "build" / "bin" / "llama-server"
    assert bench.llama_cpp_commit(binary) == "0c1e57098"
