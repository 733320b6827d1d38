"""Weights laid out for CPU inference kernels: every Linear layer, the tied output head included,
as int8 (`quantize_int8`, `--quantize int8`) or as the same float weights prepacked for oneDNN
(`pack_for_cpu`, what generate, chat and serve do to a float model on the CPU).

At batch 1 a decode step reads every weight once, so the CPU waits on memory: 500 MB of fp32
weights per token for GPT-2 124M. `quantize_int8` swaps each `nn.Linear` (and the head, which
shares its matrix with the token embedding) for `Int8Linear`, which runs PyTorch's own dynamic
quantized matmul (fbgemm on x86, qnnpack on ARM): weights stored int8 with one scale per output
row, activations quantized per call to uint8, int32 accumulation, float32 out. A quarter of the
bytes per token, and integer SIMD instead of float.

Why not weight-only int8 (`aten._weight_int8pack_mm`, torchao's int8 weight-only): on CPUs
without AVX-512 it is slower than fp32 (measured 4-20x slower on the 2-core AVX2 dev machine).

`pack_for_cpu` keeps the numbers: each weight is reordered once into oneDNN's blocked layout
and multiplied with `torch.ops.mkldnn._linear_pointwise` (what inductor's CPU "freezing" calls).
MKL's sgemm behind `F.linear` re-reads the plain layout on every call and does poorly at the
few rows a decode step has: measured 1.9-2.4x slower for the block's Linears and 3x for the
head at 16 rows (bench/results/linear_kernels-cpu.json). Results differ from `F.linear` by
float rounding only (another summation order).

int8's result is approximate: greedy tokens agree with float32 on most steps, not all
(tests/test_quantize.py states and checks the agreement and the logits tolerance). The token
embedding stays float32 for lookups; the quantized model is for inference only (no gradients,
no saving, CPU only). Both kinds of layer refuse training: their kernels have no backward.
"""

from __future__ import annotations

import platform
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


class _InferenceLinear(nn.Module):
    """What Int8Linear and PackedLinear share: the (out, in) shape, and no training (their
    kernels have no backward). `refusal` says what to train instead."""

    refusal = ""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape

    def train(self, mode: bool = True) -> _InferenceLinear:
        if mode:
            raise QuantizeError(self.refusal)
        return super().train(False)


class Int8Linear(_InferenceLinear):
    """A drop-in for an inference-mode `nn.Linear`: y = x W^T + b with W stored as int8.

    Per-output-row symmetric scales keep each row's largest weight exact to 1/254 of its
    range; the activation is quantized per call (per tensor) inside the kernel."""

    refusal = "an int8-quantized model is for inference only; train or fine-tune the float model"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight)
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
    torch.backends.quantized.engine = _engine()  # once, before the threads
    return _replace_linears(model, Int8Linear)


class PackedLinear(_InferenceLinear):
    """A drop-in for an inference-mode `nn.Linear` on the CPU: the same float weights (float32
    or bfloat16), held in oneDNN's blocked layout and multiplied by oneDNN."""

    refusal = (
        "a model packed for CPU inference is for inference only; train the model as loaded "
        "(minigpt.checkpoints.load_model), not one from pack_for_cpu"
    )

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight)
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self._bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # no backward: gradients would be lost
            raise QuantizeError("PackedLinear has no backward; run it under torch.no_grad()")
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self._bias, "none", [], "")

    def extra_repr(self) -> str:
        dtype = str(self._packed.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, {dtype} packed"


def can_pack(model: GPT) -> bool:
    """Whether `pack_for_cpu` applies: a float32 or bfloat16 model of plain Linear layers on the
    CPU, with a PyTorch built with oneDNN."""
    weight = model.transformer.wte.weight
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and isinstance(model.lm_head, nn.Linear)
    )


def packing_pays(model: GPT) -> bool:
    """Whether the sampling verbs pack `model`: it can be packed, on an x86-64 CPU, where oneDNN
    was measured faster than F.linear (bench/linear_kernels.py); on ARM, F.linear's BLAS may be
    the faster one, and nobody has measured it."""
    return can_pack(model) and platform.machine().lower() in ("x86_64", "amd64")


@torch.no_grad()
def pack_for_cpu(model: GPT) -> GPT:
    """Replace every nn.Linear of `model` (in place) and its tied output head by PackedLinear;
    returns the model in eval mode with gradients off. Only for weights that stay fixed (a
    packed layer holds a copy: later changes to the model's parameters do not reach it). The
    head's copy is extra memory (its matrix stays as the token embedding): 154 MB for GPT-2."""
    if not can_pack(model):
        weight = model.transformer.wte.weight
        raise QuantizeError(
            f"pack_for_cpu takes a float32 or bfloat16 model of nn.Linear layers on the CPU "
            f"with oneDNN; got {weight.dtype} on {weight.device}"
            + ("" if torch.backends.mkldnn.is_available() else " (this PyTorch has no oneDNN)")
        )
    return _replace_linears(model, PackedLinear)


def _replace_linears(model: GPT, layer_type: type[nn.Module]) -> GPT:
    """Swap every nn.Linear (the head included) for layer_type(weight, bias), in parallel."""
    n_params = model.num_params()  # the new layers hold no nn.Parameters: count them now
    slots = [
        (module, name, child)
        for module in model.modules()
        for name, child in module.named_children()
        if isinstance(child, nn.Linear)
    ]
    # packing into the kernel's layout is most of the cost (~1.7 CPU-s for GPT-2 124M as int8);
    # the kernels release the GIL, so the layers pack in parallel
    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        packed = pool.map(lambda slot: layer_type(slot[2].weight, slot[2].bias), slots)
        for (module, name, _), layer in zip(slots, packed, strict=True):
            setattr(module, name, layer)
    model.requires_grad_(False)
    model.num_params = lambda non_embedding=False: (
        n_params - (model.transformer.wpe.weight.numel() if non_embedding else 0)
    )
    return model.eval()
