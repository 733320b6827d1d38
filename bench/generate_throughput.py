"""Decode throughput of the engine with its KV cache against full re-forwarding, side by side.

    python bench/generate_throughput.py                       # gpt2 shape, random weights, CPU
    python bench/generate_throughput.py --model RUN_DIR --device cuda --batch-sizes 1 32
    python bench/generate_throughput.py --vs-transformers     # batch-1 greedy, CPU, + int8 rows

For each batch size, both paths generate --new-tokens tokens from the same random prompts with
the same sampling; tokens/s counts decode steps only (from the first sampled token to the last),
so the one-off prefill does not flatter either side. Prints a table and, with --out, writes JSON.

--vs-transformers: batch-1 greedy generation of --new-tokens tokens from one Hugging Face GPT-2
directory (--model, or random GPT-2 124M weights exported to one), as a user runs it:
(a) the whole command, `minigpt generate ... --temperature 0` (float32, then --quantize int8)
against a script doing transformers' `from_pretrained` + `generate(do_sample=False)` with its
defaults, each a fresh process, alternating; (b) decode-only tokens/s in this process,
(N - 1) / (time of N new tokens - time of 1), the same way for every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from minigpt.engine import Engine, Sampling  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402

N_VOCAB = 50260  # GPT-2 plus the chat tokens


def decode_tokens_per_sec(
    engine: Engine, prompts: list[list[int]], new_tokens: int, seed: int
) -> float:
    """Tokens/s over the decode steps of one generate call (prefill and first sample excluded)."""
    start, produced = None, 0
    for step in engine.stream(prompts, new_tokens, Sampling(top_k=50), seed=seed):
        if start is None:
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        else:
            produced += len(step)
    return produced / (time.perf_counter() - start)


def build_model(args: argparse.Namespace) -> GPT:
    if args.model:
        from minigpt.checkpoints import load_model

        return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    torch.manual_seed(0)
    config = GPTConfig.from_preset(args.preset)
    return GPT(config).to(device=args.device, dtype=getattr(torch, args.dtype))


PROMPT = "Hello, I'm a language model,"
HF_SCRIPT = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(directory)
model = AutoModelForCausalLM.from_pretrained(directory)
inputs = tokenizer(prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
print(tokenizer.decode(out[0]))
print(out.size(1) - inputs["input_ids"].size(1), file=sys.stderr)
"""


def whole_commands(directory: str, new_tokens: int) -> dict[str, list[str]]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    ours = [sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r}); "
            "from minigpt.cli import main; sys.exit(main())"]  # fmt: skip
    ours += ["generate", "--model", directory, "--prompt", PROMPT, "--temperature", "0"]
    ours += ["--max-new-tokens", str(new_tokens)]
    return {
        "transformers": [sys.executable, "-c", HF_SCRIPT, directory, PROMPT, str(new_tokens)],
        "minigpt float32": ours,
        "minigpt int8": [*ours, "--quantize", "int8"],
    }


def timed_run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, result.stdout


def greedy_seconds(generate, new_tokens: int) -> float:
    start = time.perf_counter()
    generate(new_tokens)
    return time.perf_counter() - start


def decode_rates(directory: str, new_tokens: int) -> tuple[dict[str, float], dict[str, list]]:
    """Decode-only tokens/s of each row, and the greedy tokens each produced."""
    import copy

    from transformers import AutoModelForCausalLM

    from minigpt.checkpoints import load_model
    from minigpt.quantize import pack_for_cpu, quantize_int8
    from minigpt.tokenizer import get_tokenizer

    tok = get_tokenizer()
    ids = tok.encode(PROMPT)
    hf = AutoModelForCausalLM.from_pretrained(directory)
    ours = load_model(directory).eval()
    int8 = quantize_int8(copy.deepcopy(ours))
    ours = pack_for_cpu(ours)  # what `minigpt generate` runs on the CPU
    tokens: dict[str, list] = {}

    def hf_generate(n):
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        tokens["transformers"] = out[0, len(ids) :].tolist()

    def engine_generate(name, model):
        engine = Engine(model, tok.n_vocab)

        def run(n):
            out = engine.generate([ids], n, Sampling(temperature=0), stop_ids={tok.eot_id})
            tokens[name] = out[0]

        return run

    rows = {
        "transformers": hf_generate,
        "minigpt float32": engine_generate("minigpt float32", ours),
        "minigpt int8": engine_generate("minigpt int8", int8),
    }
    rates = {}
    for name, generate in rows.items():
        generate(4)  # warm-up
        first = min(greedy_seconds(generate, 1) for _ in range(2))
        rates[name] = (new_tokens - 1) / (greedy_seconds(generate, new_tokens) - first)
    return rates, tokens


def vs_transformers(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model
        if directory is None:
            from minigpt.interop.hf import export_hf

            torch.manual_seed(0)
            directory = str(Path(tmp) / "gpt2-random")
            export_hf(GPT(GPTConfig.from_preset("gpt2")), directory)
        commands = whole_commands(directory, args.new_tokens)
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        outputs = {}
        for _ in range(args.repeats):  # alternating, so load on a shared machine hits all rows
            for name, cmd in commands.items():
                elapsed, outputs[name] = timed_run(cmd)
                seconds[name].append(elapsed)
        rates, tokens = decode_rates(directory, args.new_tokens)
    best = {name: min(times) for name, times in seconds.items()}
    ref = "transformers"
    n_same = sum(a == b for a, b in zip(tokens[ref], tokens["minigpt int8"], strict=False))
    print(
        f"batch-1 greedy, {args.new_tokens} new tokens, CPU float32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; best of {args.repeats}"
    )
    print(f"{'':16}  {'whole command s':>15}  {'ratio':>6}  {'decode tok/s':>12}  {'ratio':>6}")
    for name in commands:
        print(
            f"{name:16}  {best[name]:>15.2f}  {best[ref] / best[name]:>5.2f}x  "
            f"{rates[name]:>12.1f}  {rates[name] / rates[ref]:>5.2f}x"
        )
    print(
        f"tokens: minigpt float32 == transformers: {tokens['minigpt float32'] == tokens[ref]}; "
        f"int8 agrees with transformers on {n_same}/{len(tokens[ref])} greedy steps"
    )
    if args.out:
        record = {
            "mode": "vs-transformers",
            "model": args.model or "gpt2 124M shape (random weights), HF directory",
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "date": time.strftime("%Y-%m-%d"),
            "command": "python bench/generate_throughput.py " + " ".join(sys.argv[1:]),
            "new_tokens": args.new_tokens,
            "whole_command_seconds": seconds,
            "decode_tokens_per_sec": rates,
            "whole_command_ratio": {n: best[ref] / best[n] for n in commands},
            "decode_ratio": {n: rates[n] / rates[ref] for n in commands},
            "int8_greedy_agreement": f"{n_same}/{len(tokens[ref])}",
            "float32_tokens_equal_transformers": tokens["minigpt float32"] == tokens[ref],
            "load_average": os.getloadavg(),
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="run or checkpoint directory (default: random weights)")
    parser.add_argument("--preset", default="gpt2", help="shape for random weights (gpt2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument(
        "--vs-transformers", action="store_true", help="batch-1 greedy against transformers"
    )
    parser.add_argument("--repeats", type=int, default=2, help="whole-command runs per row")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_transformers:
        return vs_transformers(args)
    model = build_model(args).eval()
    generator = torch.Generator().manual_seed(0)
    cached, reforward = Engine(model, N_VOCAB), Engine(model, N_VOCAB, use_kv_cache=False)
    engine_name = args.model or f"{args.preset} (random weights)"
    print(
        f"{engine_name} on {args.device} {args.dtype}, {torch.get_num_threads()} threads; "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens"
    )
    print(f"{'batch':>5}  {'cached tok/s':>12}  {'no-cache tok/s':>14}  {'ratio':>6}")
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(0, 50257, (batch, args.prompt_len), generator=generator).tolist()
        decode_tokens_per_sec(cached, prompts, 8, seed=0)  # warm-up: allocator, kernels
        fast = decode_tokens_per_sec(cached, prompts, args.new_tokens, seed=0)
        slow = decode_tokens_per_sec(reforward, prompts, args.new_tokens, seed=0)
        rows.append({"batch": batch, "cached": fast, "no_cache": slow, "ratio": fast / slow})
        print(f"{batch:>5}  {fast:>12.1f}  {slow:>14.1f}  {fast / slow:>5.1f}x", flush=True)
    if args.out:
        record = {
            "model": engine_name,
            "device": args.device,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "torch": torch.__version__,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "tokens_per_sec": rows,
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
