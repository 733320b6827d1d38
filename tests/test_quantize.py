"""CPU inference layers (`minigpt.quantize`): int8 and oneDNN-packed float, against the float
model they came from."""

from __future__ import annotations

import copy
import platform

import pytest
import torch

from minigpt.checkpoints import save_model
from minigpt.cli import main
from minigpt.engine import Engine, Sampling
from minigpt.model import GPT
from minigpt.quantize import (
    Int8Linear,
    PackedLinear,
    QuantizeError,
    can_pack,
    check_quantize,
    pack_for_cpu,
    quantize_int8,
)
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
# What int8 must keep of its float32 original on the trained model below. Measured: argmax
# agreement 0.998 (teacher-forced, 512 positions), free-running greedy agreement 1.0 (96 steps),
# logits error / logits std 0.071 at worst and 0.0028 on average. The bounds leave a margin.
MIN_ARGMAX_AGREEMENT = 0.98
MIN_GREEDY_AGREEMENT = 0.90
MAX_RELATIVE_LOGITS_ERROR = 0.15
MEAN_RELATIVE_LOGITS_ERROR = 0.01


def _text_bytes() -> torch.Tensor:
    from minigpt.data.prepare import builtin_documents

    text = next(iter(builtin_documents()))[:60_000]
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


@pytest.fixture(scope="module")
def trained():
    """A byte-level GPT trained for a few seconds: peaked, structured logits like a real model's
    (random weights would give near-uniform logits whose argmax is a coin toss)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the one_thread fixture
    torch.manual_seed(0)
    data = _text_bytes()
    train, held_out = data[:50_000], data[50_000:]
    model = GPT(tiny_config(vocab_size=256, n_embd=64, n_head=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        starts = torch.randint(0, train.numel() - 65, (16,))
        batch = torch.stack([train[s : s + 65] for s in starts.tolist()])
        _, loss = model(batch[:, :-1], batch[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    assert loss.item() < 3.5  # it learned the byte statistics (uniform is 5.5)
    return model.eval(), held_out


def test_int8_replaces_every_linear_and_the_tied_head(trained):
    model, _ = trained
    q = quantize_int8(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == linears == 4 * 2 + 1
    assert isinstance(q.lm_head, Int8Linear) and q.lm_head.out_features == 256
    assert q.num_params() == model.num_params()  # what chat prints


def test_int8_linear_matches_a_hand_quantized_matmul():
    """The kernel against the arithmetic it stands for: per-row int8 weights, activation
    rounded to 7 bits per tensor (reduce_range), exact integer products."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(3, 96)
    got = Int8Linear(linear.weight, linear.bias)(x)
    w = linear.weight.detach()
    w_scale = w.abs().amax(dim=1) / 127
    w_q = torch.round(w / w_scale[:, None])
    # asymmetric uint8 (7-bit on x86) activation quantization over the tensor's range
    levels = 127 if torch.backends.quantized.engine in ("x86", "fbgemm") else 255
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    x_scale = (hi - lo) / levels
    zero = round(-lo / x_scale)
    x_q = (torch.round(x / x_scale) + zero).clamp(0, levels) - zero
    expected = (x_q * x_scale) @ (w_q * w_scale[:, None]).t() + linear.bias.detach()
    assert torch.allclose(got, expected, atol=2e-3 * expected.abs().max().item())
    assert not torch.allclose(got, linear(x), atol=1e-5)  # it is not the float matmul


def test_int8_logits_and_greedy_tokens_track_float32(trained):
    model, held_out = trained
    q = quantize_int8(copy.deepcopy(model))
    windows = held_out[: 8 * 64].view(8, 64)
    with torch.inference_mode():
        ref, _ = model(windows)
        got, _ = q(windows)
    relative = (got - ref).abs().max() / ref.std()
    agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    typical = (got - ref).abs().mean() / ref.std()
    assert relative < MAX_RELATIVE_LOGITS_ERROR and typical < MEAN_RELATIVE_LOGITS_ERROR
    assert agreement >= MIN_ARGMAX_AGREEMENT, agreement
    # free-running greedy decoding through the engine and its KV cache
    prompts = [windows[i, :8].tolist() for i in range(4)]
    fp = Engine(model, 256).generate(prompts, 24, Sampling(temperature=0))
    i8 = Engine(q, 256).generate(prompts, 24, Sampling(temperature=0))
    same = sum(a == b for x, y in zip(fp, i8, strict=True) for a, b in zip(x, y, strict=True))
    assert same / (4 * 24) >= MIN_GREEDY_AGREEMENT, (fp, i8)


def test_unsupported_combinations_fail_clearly(trained):
    with pytest.raises(QuantizeError, match="CPU only"):
        check_quantize("int8", "cuda", None)
    with pytest.raises(QuantizeError, match="drop --dtype bfloat16"):
        check_quantize("int8", "cpu", torch.bfloat16)
    with pytest.raises(QuantizeError, match="unknown --quantize"):
        check_quantize("int4", "cpu", None)
    q = quantize_int8(copy.deepcopy(trained[0]))
    with pytest.raises(QuantizeError, match="inference only"):
        q.train()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(directory, GPT(tiny_config()), step=0)
    return directory


def test_int8_loss_tracks_float32_and_the_fp32_path_keeps_its_chunked_head(trained):
    model, held_out = trained
    q = quantize_int8(copy.deepcopy(model))
    windows = held_out[: 8 * 65].view(8, 65)
    inputs, targets = windows[:, :-1], windows[:, 1:].contiguous()
    with torch.inference_mode():
        _, ref = model(inputs, targets)
        _, got = q(inputs, targets)
        logits, _ = q(inputs)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    assert torch.allclose(got, expected, rtol=1e-5)  # the int8 head's own logits, chunked
    assert abs(got - ref) / ref < 0.02


@pytest.mark.parametrize(
    "verb",
    [
        ["generate", "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "4"],
        ["chat", "--temperature", "0", "--max-new-tokens", "4"],
        ["eval", "loss", "--tokens", "4096"],
        ["eval", "hellaswag", "--limit", "4"],
        ["eval", "piqa", "--limit", "4"],
        ["eval", "suite", "--tasks", "piqa,copa", "--limit", "4", "--no-progress"],
        ["eval", "harness", "--tasks", "copa", "--limit", "4"],
    ],
    ids=lambda verb: " ".join(verb[:2]) if verb[0] == "eval" else verb[0],
)
def test_every_verb_that_offers_quantize_runs_with_it(
    verb, checkpoint, tmp_path, capsys, monkeypatch, eval_data_dir
):
    """`--quantize int8` end to end, in process, on every verb that takes it."""
    import io
    import sys

    from tests.conftest import write_shakespeare_shards
    from tests.test_hellaswag import official_rows, write_jsonl

    monkeypatch.setenv("MINIGPT_EVAL_DATA", str(eval_data_dir))
    extra = []
    if verb[:2] == ["eval", "loss"]:
        extra = ["--data", str(write_shakespeare_shards(tmp_path))]
    elif verb[:2] == ["eval", "hellaswag"]:
        write_jsonl(tmp_path / "hellaswag.jsonl", official_rows(4))
        extra = ["--data", str(tmp_path / "hellaswag.jsonl")]
    elif verb[:2] == ["eval", "harness"]:
        pytest.importorskip("lm_eval")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/exit\n"))
    assert main([*verb, *extra, "--model", str(checkpoint), "--quantize", "int8"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and out.out
    expected = {"generate": "Hi", "chat": "you> ", "loss": "val loss ", "hellaswag": "hellaswag acc ",
                "piqa": "piqa acc ", "suite": "COPA", "harness": "copa"}  # fmt: skip
    assert expected[verb[1] if verb[0] == "eval" else verb[0]] in out.out


def test_serve_loads_the_int8_model(checkpoint):
    """`serve` builds its engine from the same loader; running the server is test_serve's."""
    from minigpt.cli import build_parser
    from minigpt.cli.common import load_inference_model

    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--quantize", "int8"])
    model, n_vocab = load_inference_model(args)
    assert isinstance(model.lm_head, Int8Linear)
    (out,) = Engine(model, n_vocab).generate([[1, 2]], 3, Sampling(temperature=0))
    assert len(out) == 3


def test_quantize_refuses_gpu_and_half_precision_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")  # the check comes first: no load error
    assert main(["generate", "--model", missing, "--prompt", "x", "--quantize", "int8",
                 "--device", "cuda"]) == 2  # fmt: skip
    assert "runs on the CPU only" in capsys.readouterr().err
    assert main(["eval", "loss", "--model", missing, "--data", str(tmp_path), "--quantize",
                 "int8", "--dtype", "bfloat16"]) == 2  # fmt: skip
    assert "drop --dtype bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 768), (16, 768), (3, 5, 768), (0, 768)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_is_the_float_matmul(dtype, shape, bias):
    """oneDNN's blocked layout holds the same weights: F.linear's numbers up to summation order
    (decode's shapes: one row, 16 rows, a prefill's 3-D chunk, no rows)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(768, 2304, bias=bias).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        expected = linear(x).float()
        got = PackedLinear(linear.weight, linear.bias)(x)
    assert got.dtype == dtype and got.shape == expected.shape
    scale = expected.abs().max().item() if expected.numel() else 1.0
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16's 8-bit mantissa, rounded once
    assert torch.allclose(got.float(), expected, atol=tolerance * scale, rtol=0)


def test_pack_for_cpu_keeps_the_logits_and_greedy_tokens(trained):
    model, held_out = trained
    packed = pack_for_cpu(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 4 * 2 + 1
    assert isinstance(packed.lm_head, PackedLinear) and packed.num_params() == model.num_params()
    windows = held_out[: 8 * 64].view(8, 64)
    with torch.inference_mode():
        ref, _ = model(windows)
        got, _ = packed(windows)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    # free-running greedy through the engine, batched continuous decoding against float32 alone
    prompts = [windows[i, : 4 + 3 * i].tolist() for i in range(8)]
    fp = [Engine(model, 256).generate([p], 24, Sampling(temperature=0))[0] for p in prompts]
    assert Engine(packed, 256).generate(prompts, 24, Sampling(temperature=0)) == fp


def test_packed_model_refuses_training_and_gradients(trained):
    packed = pack_for_cpu(copy.deepcopy(trained[0]))
    with pytest.raises(QuantizeError, match="inference only"):
        packed.train()
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(QuantizeError, match="no backward"):
        packed.transformer.h[0].mlp.c_fc(x)
    assert not can_pack(packed)  # already packed: no nn.Linear head
    with pytest.raises(QuantizeError, match="float32 or bfloat16"):
        pack_for_cpu(copy.deepcopy(trained[0]).half())
    with pytest.raises(QuantizeError, match="float32 or bfloat16"):
        pack_for_cpu(quantize_int8(copy.deepcopy(trained[0])))


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="packed by default on x86-64"
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_sampling_verbs_load_a_float_model_packed(checkpoint, dtype, capsys):
    """generate, chat and serve share load_inference_model: a float model on the CPU comes
    packed, and generates what the unpacked model does."""
    from minigpt.checkpoints import load_model
    from minigpt.cli import build_parser
    from minigpt.cli.common import load_inference_model

    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--dtype", dtype])
    model, n_vocab = load_inference_model(args)
    assert isinstance(model.lm_head, PackedLinear)
    reference = load_model(checkpoint, dtype=getattr(torch, dtype)).eval()
    prompts = [[1, 2, 3], [7] * 9]
    expected = Engine(reference, n_vocab).generate(prompts, 6, Sampling(temperature=0))
    assert Engine(model, n_vocab).generate(prompts, 6, Sampling(temperature=0)) == expected


def test_the_sampling_verbs_keep_f_linear_off_x86(checkpoint, monkeypatch):
    """Packing is measured faster on x86-64 only; elsewhere the loader leaves the model as is."""
    from minigpt.cli import build_parser
    from minigpt.cli.common import load_inference_model

    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    args = build_parser().parse_args(["serve", "--model", str(checkpoint)])
    model, _ = load_inference_model(args)
    assert isinstance(model.lm_head, torch.nn.Linear)
