"""The one device and dtype policy, and that every verb follows it."""

from __future__ import annotations

import argparse

import pytest
import torch

from minigpt import device as policy
from minigpt.device import gpu_peak_flops, resolve_device, resolve_dtype
from minigpt.errors import MinigptError

from conftest import tiny_config


def test_auto_dtype_wants_native_bf16(monkeypatch):
    cuda = torch.device("cuda", 0)
    for capability, dtype in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                              ((7, 0), torch.float16), ((7, 5), torch.float16)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert resolve_dtype("auto", cuda) == dtype
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(MinigptError, match=r"--dtype='bf16'; choose auto, float32"):
        resolve_dtype("bf16", cuda, key="--dtype")


def test_peak_flops_per_gpu_model_and_dtype():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", bf16) == 989e12  # SXM
    assert gpu_peak_flops("NVIDIA H100 PCIe", bf16) == 756e12
    assert gpu_peak_flops("NVIDIA H100 NVL", bf16) == 835e12
    assert gpu_peak_flops("NVIDIA H200", bf16) == 989e12  # SXM
    assert gpu_peak_flops("NVIDIA H200 NVL", bf16) == 835e12  # not the SXM part
    assert gpu_peak_flops("NVIDIA GH200 480GB", bf16) == 989e12
    assert gpu_peak_flops("NVIDIA H20", bf16) == 148e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", fp32) == 156e12  # tf32
    assert gpu_peak_flops("NVIDIA A10", bf16) == 125e12  # not the A100
    assert gpu_peak_flops("NVIDIA L40", bf16) == 181e12  # not the L4 or the L40S
    assert gpu_peak_flops("NVIDIA L4", bf16) == 121e12
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", fp16) == 125e12
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", bf16) is None
    assert gpu_peak_flops("NVIDIA RTX A4000", bf16) is None  # not read as the A40
    assert gpu_peak_flops("Some Future GPU", bf16) is None


def test_every_listed_gpu_has_a_peak_for_the_dtypes_it_trains_in():
    for name, peaks in policy.GPU_PEAK_TFLOPS:
        # the name as the driver reports it resolves to its own row, not to one listed earlier
        assert gpu_peak_flops(f"NVIDIA {name}", torch.float32) == peaks["float32"] * 1e12, name
        assert peaks["float16"] > 0 and peaks["float32"] > 0, name
        assert set(peaks) <= {"bfloat16", "float16", "float32"}, name


def test_explicit_gpu_index_under_torchrun_is_refused():
    with pytest.raises(MinigptError, match="under torchrun each process uses the GPU"):
        resolve_device("cuda:1", local_rank=0, launched=True)
    assert resolve_device("cpu", launched=True) == torch.device("cpu")
    with pytest.raises(MinigptError, match="--device='gpu' is not a device"):
        resolve_device("gpu", key="--device")


class NoBatches:
    def next_batch(self):
        raise AssertionError("not trained")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_training_and_inference_verbs_follow_the_one_auto_rule(monkeypatch, tmp_path):
    """Whatever `auto` means on this machine, the trainer, the CLI's model loader (generate,
    chat, serve, eval) and the evaluators' autocast take it from minigpt.device: patched there,
    every one of them follows."""
    from minigpt.checkpoints import save_model
    from minigpt.cli.common import load_model_from_args
    from minigpt.config import LogSection, TrainSection
    from minigpt.device import inference_autocast
    from minigpt.model import GPT
    from minigpt.train.trainer import Trainer

    monkeypatch.setattr(policy, "auto_dtype", lambda device: torch.bfloat16)
    model = GPT(tiny_config())
    train = TrainSection(micro_batch=1, total_batch_tokens=8, sequence_length=8, device="cpu")
    trainer = Trainer(model, train, LogSection(progress=False), NoBatches(), tmp_path)
    assert trainer.dtype == torch.bfloat16
    save_model(tmp_path / "model", model)
    args = argparse.Namespace(
        model=str(tmp_path / "model"), device="auto", dtype="auto", verify=False
    )
    loaded, device = load_model_from_args(args)
    assert device == torch.device("cpu") and loaded.transformer.wte.weight.dtype == torch.bfloat16
    monkeypatch.setattr(policy, "auto_dtype", lambda device: torch.float16)  # as on a V100
    with pytest.warns(UserWarning):  # "CUDA is not available": only the choice is tested here
        evaluation = inference_autocast(model, torch.device("cuda"))
    assert isinstance(evaluation, torch.autocast) and evaluation.fast_dtype == torch.float16
