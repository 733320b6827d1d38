"""Where minigpt runs and in what precision: the one policy of every verb.

- Device `auto`: this process's GPU when CUDA is available (under torchrun, the GPU of its
  LOCAL_RANK), else the CPU.
- Dtype `auto`: bf16 on GPUs with native bf16 (compute capability 8.0+: A100, H100...), fp16 on
  older GPUs (V100, T4: torch's `is_bf16_supported()` says yes there too, but emulates it
  slowly; training adds a GradScaler), fp32 on the CPU.
- Training keeps fp32 weights and runs forwards under autocast of its dtype; everything that runs
  inside training (validation, samples, HellaSwag, tasks) keeps the training autocast. Standalone
  inference (generate, chat, serve) casts the weights to the dtype; evaluation of an fp32 model
  on a GPU runs under autocast of the GPU's auto dtype.
- MFU: the dense peak FLOP/s of the GPU for the dtype, looked up by device name.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext

import torch

from minigpt.errors import MinigptError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense (not sparse) tensor-core peak TFLOP/s per GPU model, for MFU: bf16, fp16, and tf32 (what
# float32 matmuls run at here). Matched in order, as whole words, against torch's device name, so
# a longer name comes before its prefix: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA H200" (SXM), "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB"; vendor data
# sheets (dense figures: half the "with sparsity" ones).
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GB200", {"bfloat16": 2500.0, "float16": 2500.0, "float32": 1250.0}),
    ("B200", {"bfloat16": 2250.0, "float16": 2250.0, "float32": 1100.0}),
    ("B100", {"bfloat16": 1750.0, "float16": 1750.0, "float32": 875.0}),
    ("GH200", {"bfloat16": 989.0, "float16": 989.0, "float32": 495.0}),
    ("H200 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 418.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 495.0}),  # SXM
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 418.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 495.0}),  # SXM
    ("H800", {"bfloat16": 989.0, "float16": 989.0, "float32": 495.0}),
    ("H20", {"bfloat16": 148.0, "float16": 148.0, "float32": 74.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("A800", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 183.0}),
    ("L40", {"bfloat16": 181.0, "float16": 181.0, "float32": 90.5}),
    ("RTX 6000 Ada", {"bfloat16": 364.0, "float16": 364.0, "float32": 182.0}),
    ("RTX A6000", {"bfloat16": 155.0, "float16": 155.0, "float32": 77.4}),
    ("A40", {"bfloat16": 150.0, "float16": 150.0, "float32": 74.8}),
    ("A10G", {"bfloat16": 70.0, "float16": 70.0, "float32": 35.0}),
    ("A10", {"bfloat16": 125.0, "float16": 125.0, "float32": 62.5}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0}),
    ("V100", {"float16": 125.0, "float32": 15.7}),  # no bf16 tensor cores, no tf32
    ("T4", {"float16": 65.0, "float32": 8.1}),
]


def resolve_device(
    name: str, local_rank: int = 0, launched: bool = False, key: str = "train.device"
) -> torch.device:
    """`auto` -> this process's GPU when CUDA is available, else the CPU. Under torchrun
    (`launched`) each process takes the GPU of its LOCAL_RANK, so an explicit index is refused:
    every process would pile onto that one GPU. `key` names the setting in error messages."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:  # torch's message lists every backend it was built to know
        raise MinigptError(
            f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:N (or mps)"
        ) from e
    if device.type == "cuda" and device.index is not None and launched:
        raise MinigptError(
            f"{key}={name!r} names one GPU, but under torchrun each process uses the GPU "
            f"of its LOCAL_RANK; set {key}=cuda (or auto), and pick GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MinigptError(f"{key}={name!r} but CUDA is not available on this machine")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise MinigptError(
                f"{key}={name!r}: this machine has {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    return device


def auto_dtype(device: torch.device) -> torch.dtype:
    """What `auto` means on `device` (see the module docstring)."""
    if device.type != "cuda":
        return torch.float32
    native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
    return torch.bfloat16 if native_bf16 else torch.float16


def resolve_dtype(name: str, device: torch.device, key: str = "train.dtype") -> torch.dtype:
    """A dtype name (`auto`, float32, bfloat16, float16) as a torch dtype on `device`."""
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPES:
        raise MinigptError(f"{key}={name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to `dtype` on the device's type; nothing for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def inference_autocast(model: torch.nn.Module, device: torch.device) -> AbstractContextManager:
    """The auto dtype's autocast for an fp32 model on a GPU; nothing on the CPU, for a model
    already in low precision, or inside the caller's own autocast (the trainer's), which is
    kept."""
    if device.type != "cuda" or torch.is_autocast_enabled(device.type):
        return nullcontext()
    if next(model.parameters()).dtype != torch.float32:
        return nullcontext()
    return autocast(device, auto_dtype(device))


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of the GPU named `device_name` in `dtype`; None when not listed."""
    for key, peaks in GPU_PEAK_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            tflops = peaks.get(str(dtype).removeprefix("torch."))
            return tflops * 1e12 if tflops else None
    return None


def peak_flops(device: torch.device, dtype: torch.dtype, configured_tflops: float) -> float | None:
    """The device's dense peak FLOP/s for `dtype`: `configured_tflops` when set, else the
    GPU_PEAK_TFLOPS entry for this GPU; None when unknown (CPUs, unlisted GPUs)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    return None
