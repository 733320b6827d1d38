"""int8 inference on the CPU: every Linear layer, the tied output head included, as int8 weights.

At batch 1 a decode step reads every weight once, so the CPU waits on memory: 500 MB of fp32
weights per token for GPT-2 124M. `quantize_int8` swaps each `nn.Linear` (and the head, which
shares its matrix with the token embedding) for `Int8Linear`, which runs PyTorch's own dynamic
quantized matmul (fbgemm on x86, qnnpack on ARM): weights stored int8 with one scale per output
row, activations quantized per call to uint8, int32 accumulation, float32 out. A quarter of the
bytes per token, and integer SIMD instead of float.

Why not weight-only int8 (`aten._weight_int8pack_mm`, torchao's int8 weight-only): on CPUs
without AVX-512 it is slower than fp32 (measured 4-20x slower on the 2-core AVX2 dev machine).

The result is approximate: greedy tokens agree with float32 on most steps, not all
(tests/test_quantize.py states and checks the agreement and the logits tolerance). The token
embedding stays float32 for lookups; the quantized model is for inference only (no gradients,
no saving, CPU only).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

from minigpt.errors import MinigptError
from minigpt.model import GPT

QUANTIZE_CHOICES = ("int8",)


class QuantizeError(MinigptError, ValueError):
    """A quantization request this build cannot serve (device, dtype, training)."""


def _engine() -> str:
    """The quantized kernel backend for this CPU: fbgemm/x86 on x86-64, qnnpack on ARM."""
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    raise QuantizeError(
        "this PyTorch build has no quantized CPU kernels (fbgemm/qnnpack); run without --quantize"
    )


class Int8Linear(nn.Module):
    """A drop-in for an inference-mode `nn.Linear`: y = x W^T + b with W stored as int8.

    Per-output-row symmetric scales keep each row's largest weight exact to 1/254 of its
    range; the activation is quantized per call (per tensor) inside the kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        engine = _engine()
        if torch.backends.quantized.engine != engine:
            torch.backends.quantized.engine = engine
        # fbgemm's AVX2 path sums pairs of u8*s8 products in int16: 7-bit activations avoid
        # its overflow (what torch's own dynamic quantization does on x86)
        self.reduce_range = engine in ("x86", "fbgemm")
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        b = None if bias is None else bias.detach().float()
        with warnings.catch_warnings():
            # torch 2.13 deprecates quantized tensors (the input format of the fbgemm kernels),
            # with no replacement for CPU int8 matmuls yet; the pinned torch still has them
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            qweight = torch.quantize_per_channel(
                w, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8
            )
        self._packed = torch.ops.quantized.linear_prepack(qweight, b)

    def train(self, mode: bool = True) -> Int8Linear:
        if mode:
            raise QuantizeError(
                "an int8-quantized model is for inference only; train or fine-tune the float model"
            )
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def check_quantize(quantize: str | None, device: str | torch.device, dtype: torch.dtype | None):
    """Raise QuantizeError for a combination the int8 kernels do not run."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_CHOICES:
        raise QuantizeError(
            f"unknown --quantize {quantize!r}; choose {', '.join(QUANTIZE_CHOICES)}"
        )
    try:
        kind = torch.device(device).type
    except RuntimeError:  # not a device at all: the device check says so
        kind = "cpu"
    if kind != "cpu":
        raise QuantizeError(
            f"--quantize {quantize} runs on the CPU only (got --device {device}); on a GPU use "
            "--dtype bfloat16 instead"
        )
    if dtype not in (None, torch.float32):
        raise QuantizeError(
            f"--quantize {quantize} computes in float32 between int8 matmuls; drop --dtype "
            f"{str(dtype).removeprefix('torch.')} (or pass --dtype float32)"
        )


@torch.no_grad()
def quantize_int8(model: GPT) -> GPT:
    """Replace every nn.Linear of `model` (in place, CPU, float32) and its tied output head by
    Int8Linear; returns the model in eval mode with gradients off."""
    weight = model.transformer.wte.weight
    check_quantize("int8", weight.device, weight.dtype)
    n_params = model.num_params()  # int8 layers hold no nn.Parameters: count them now
    torch.backends.quantized.engine = _engine()  # once, before the threads
    slots = [
        (module, name, child)
        for module in model.modules()
        for name, child in module.named_children()
        if isinstance(child, nn.Linear)
    ]
    # packing into the kernel's layout is most of the cost (~1.7 CPU-s for GPT-2 124M); the
    # kernels release the GIL, so the layers pack in parallel
    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        packed = pool.map(lambda slot: Int8Linear(slot[2].weight, slot[2].bias), slots)
        for (module, name, _), layer in zip(slots, packed, strict=True):
            setattr(module, name, layer)
    model.requires_grad_(False)
    model.quantized = "int8"
    model.num_params = lambda non_embedding=False: (
        n_params - (model.transformer.wpe.weight.numel() if non_embedding else 0)
    )
    return model.eval()
