"""Import from and export to Hugging Face transformers' GPT-2 layout (`GPT2LMHeadModel`).

Our parameter names are transformers' names, so the only differences are: transformers stores the
four projection matrices as `Conv1D` weights, transposed relative to `nn.Linear`; its checkpoints
carry `attn.bias` / `attn.masked_bias` causal-mask buffers that we do not need; OpenAI's own hub
files (`gpt2`, `gpt2-medium`, ...) drop the `transformer.` prefix; and the vocabulary differs in
size. Imported embeddings are padded to our 50,304 rows; rows the file lacks (the chat tokens when
importing OpenAI's weights, and the padding) are set to the mean of the 50,257 GPT-2 text-token
rows, so that new tokens start as an "average" token instead of a zero row whose logit would tower
over real tokens, and so that import -> export -> import is lossless. Exports keep the true
vocabulary, GPT-2's 50,257 tokens plus our three chat tokens (50,260 rows), and drop the padding.

Loading never executes code from the files: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minigpt.errors import MinigptError
from minigpt.interop.hf_tokenizer import write_tokenizer_files
from minigpt.model import (
    GPT,
    GPT2_VOCAB_SIZE,
    PADDED_VOCAB_SIZE,
    GPTConfig,
    state_dict_mismatch,
    weights_left_uninitialized,
)
from minigpt.tokenizer import SPECIAL_TOKENS

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
EXPORT_VOCAB_SIZE = max(SPECIAL_TOKENS.values()) + 1  # 50,260: GPT-2 plus the chat tokens
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # not c_attn.bias
EOT_ID = SPECIAL_TOKENS["<|endoftext|>"]
END_ID = SPECIAL_TOKENS["<|END|>"]
# config.json settings that change the maths; the values our GPT implements
REQUIRED_SETTINGS = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "tie_word_embeddings": (True,),
    "n_inner": (None,),
}
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class HFError(MinigptError, ValueError):
    """A Hugging Face directory or hub name that is not a GPT-2 model we can load."""


def is_hf_directory(path: str | os.PathLike) -> bool:
    """True for a transformers model directory (config.json, no minigpt model.json)."""
    path = Path(path)
    return (path / CONFIG).is_file() and not (path / "model.json").is_file()


# ------------------------------------------------------------------------------------------ import
def from_pretrained(
    name_or_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> GPT:
    """A GPT with GPT-2 weights from a transformers directory or a hub name (`gpt2`, ...)."""
    directory = Path(name_or_dir)
    if not directory.is_dir():
        directory = _download(str(name_or_dir))
    config = read_config(directory)
    with weights_left_uninitialized():  # every weight comes from the file
        model = GPT(config)
    load_hf_state(model, read_weights(directory), source=directory)
    return model.to(device=device, dtype=dtype)


def _download(name: str) -> Path:
    if not HUB_NAME.match(name):
        raise HFError(f"{name}: no such directory, and not a Hugging Face hub model name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=[CONFIG, SAFETENSORS]))
    except Exception as e:  # offline, unknown repo, gated repo: all mean "cannot have it"
        raise HFError(
            f"{name}: no such directory, and downloading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {e})"
        ) from e


def read_config(directory: str | os.PathLike) -> GPTConfig:
    """Our GPTConfig for a transformers GPT-2 config.json; refuses other architectures."""
    path = Path(directory) / CONFIG
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFError(f"{path}: unreadable ({e})") from e
    if hf.get("model_type") != "gpt2":
        found = ", ".join(hf.get("architectures") or []) or f"model_type {hf.get('model_type')!r}"
        raise HFError(f"{path}: {found} is not GPT-2; only GPT2LMHeadModel checkpoints import")
    unsupported = [
        f"{key}={hf[key]!r}"
        for key, allowed in REQUIRED_SETTINGS.items()
        if key in hf and hf[key] not in allowed
    ]
    if unsupported:
        raise HFError(f"{path}: GPT-2 variant with {', '.join(unsupported)} is not supported")
    vocab = hf.get("vocab_size", GPT2_VOCAB_SIZE)
    if not GPT2_VOCAB_SIZE <= vocab <= PADDED_VOCAB_SIZE:
        raise HFError(
            f"{path}: vocab_size {vocab} is not GPT-2's tokenizer (expected "
            f"{GPT2_VOCAB_SIZE}..{PADDED_VOCAB_SIZE})"
        )
    return GPTConfig(
        block_size=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=hf.get("n_embd", 768),
    )


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a transformers directory: model.safetensors, else pytorch_model.bin."""
    directory = Path(directory)
    try:
        if (directory / SAFETENSORS).is_file():
            return load_file(str(directory / SAFETENSORS))
        if (directory / PYTORCH_BIN).is_file():
            state = torch.load(directory / PYTORCH_BIN, map_location="cpu", weights_only=True)
        else:
            raise HFError(f"{directory}: no {SAFETENSORS} or {PYTORCH_BIN}")
    except HFError:
        raise
    except Exception as e:  # truncated files, pickles with code in them
        raise HFError(f"{directory}: unreadable weights ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise HFError(f"{directory / PYTORCH_BIN}: not a state dict ({type(state).__name__})")
    return state


def load_hf_state(
    model: GPT, hf_state: dict[str, torch.Tensor], source: str | os.PathLike = "weights"
) -> None:
    """Load transformers' GPT-2 state dict into `model`: prefixed, transposed, vocab padded."""
    state = {}
    for key, tensor in hf_state.items():
        key = key.removeprefix("transformer.")
        if key == "lm_head.weight" or key.endswith(MASK_BUFFERS):
            continue  # the head is tied to wte; causal masking needs no stored buffer
        state[f"transformer.{key}"] = tensor.t() if key.endswith(CONV1D) else tensor
    wte = state.get("transformer.wte.weight")
    if wte is not None and wte.ndim == 2 and wte.size(0) < model.config.vocab_size:
        state["transformer.wte.weight"] = _pad_rows(wte, model.config.vocab_size)
    expected = model.state_dict()
    expected.pop("lm_head.weight")
    mismatch = state_dict_mismatch(state, expected)
    if mismatch:
        raise HFError(f"{source}: weights do not match config.json: {mismatch}")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state)


def _pad_rows(wte: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean GPT-2 text-token row (see the module docstring)."""
    mean = wte[:GPT2_VOCAB_SIZE].float().mean(dim=0).to(wte.dtype)
    return torch.cat([wte, mean.expand(rows - wte.size(0), -1)])


# ------------------------------------------------------------------------------------------ export
def export_hf(
    model: GPT, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> list[Path]:
    """Write `model` as a transformers GPT2LMHeadModel directory with our tokenizer, or a reward
    model (`minigpt.reward.RewardModel`) as a GPT2ForSequenceClassification with one label.

    `AutoModelForCausalLM.from_pretrained(out_dir)` (reward models:
    `AutoModelForSequenceClassification`) and `AutoTokenizer.from_pretrained(out_dir)` load it
    with no extra code. Returns the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state(model, dtype), str(out_dir / SAFETENSORS), metadata={"format": "pt"})
    files = [out_dir / SAFETENSORS]
    config = hf_config(model.config, dtype)
    contents = [(CONFIG, config), ("generation_config.json", GENERATION_CONFIG)]
    if getattr(model, "head", None) == "reward":
        # the score is read at the rightmost token that is not padding (<|endoftext|>)
        config.update(
            architectures=["GPT2ForSequenceClassification"], num_labels=1, pad_token_id=EOT_ID
        )
        contents = contents[:1]
    for name, content in contents:
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
        files.append(out_dir / name)
    return files + write_tokenizer_files(out_dir, model_max_length=model.config.block_size)


def to_hf_state(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our state dict in transformers' layout: Conv1D transposes, padding rows dropped (a
    reward model's `score.weight` is transformers' own)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied: transformers rebuilds it from wte
        if key == "transformer.wte.weight":
            tensor = tensor[:EXPORT_VOCAB_SIZE]
        if key.endswith(CONV1D):
            tensor = tensor.t()
        state[key] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    return state


def hf_config(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for a GPT2LMHeadModel with our shape and the exported vocabulary."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": EXPORT_VOCAB_SIZE,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


# generation stops at the end of a document or at the end of an assistant turn
GENERATION_CONFIG = {
    "bos_token_id": EOT_ID,
    "eos_token_id": [EOT_ID, END_ID],
    "pad_token_id": EOT_ID,
}
