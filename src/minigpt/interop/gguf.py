"""Export to GGUF, the one-file format of llama.cpp (llama-server, Ollama, LM Studio, ...).

Written with `gguf`, llama.cpp's own Python writer, following what llama.cpp's converter does for
GPT-2 (`GPT2Model` in `convert_hf_to_gguf.py`): architecture `gpt2`, its hyper-parameters, tensors
named `token_embd`, `position_embd`, `blk.N.{attn_norm,attn_qkv,attn_output,ffn_norm,ffn_up,
ffn_down}`, `output_norm`, and no `output` because the head is tied to `token_embd`. Our matrices
are `nn.Linear` weights, (out, in), which is ggml's layout already: unlike transformers' `Conv1D`
weights, nothing is transposed. Norms, biases and the position table stay F32 in every file type,
as llama.cpp's converter keeps them; the other matrices take the chosen type.

The tokenizer travels inside the file: GPT-2's byte-level token strings and merges (derived from
our packaged ranks, as for the Hugging Face export), `<|endoftext|>` and the three chat tokens as
control tokens (typed in text, they stay text unless the caller parses specials), and the padded
embedding rows beyond them as unused `[PAD<id>]` tokens, so llama.cpp's vocabulary has exactly
the model's rows. BOS = EOS = `<|endoftext|>`, and no BOS is added (GPT-2 never had one). A chat
model also gets EOT = `<|END|>`, where llama.cpp stops a reply, and the chat template of the
Hugging Face export.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import torch

from minigpt.errors import MinigptError
from minigpt.interop.hf_tokenizer import CHAT_TEMPLATE, gpt2_vocab_and_merges
from minigpt.model import GPT
from minigpt.tokenizer import END, EOT, SPECIAL_TOKENS

ARCH = "gpt2"
TOKENIZER_PRE = "gpt-2"  # llama.cpp's name for GPT-2's pre-tokenizer regex
TOKENIZER_SIZE = max(SPECIAL_TOKENS.values()) + 1  # 50,260: GPT-2 plus the chat tokens
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


class GGUFError(MinigptError, ValueError):
    """A model or output path that cannot become a GGUF file llama.cpp loads."""


def export_gguf(
    model: GPT,
    path: str | os.PathLike,
    file_type: str = "f32",
    chat: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write `model` as one GGUF file at `path` and return it.

    file_type: f32 (lossless weights), f16, or q8_0 (8-bit blocks of 32 values; needs n_embd
    divisible by 32).
    chat: the model was fine-tuned on our chat format; adds EOT = `<|END|>` and the chat template.
    The file is written under a temporary name and renamed, so `path` is never half-written.
    """
    path = Path(path)
    if path.is_dir():
        raise GGUFError(f"{path} is a directory; give the path of the .gguf file to write")
    if path.exists() and not overwrite:
        raise GGUFError(f"{path} exists; pass --overwrite to replace it")
    if file_type not in FILE_TYPES:
        raise GGUFError(
            f"unknown GGUF file type {file_type!r}; choose one of {', '.join(FILE_TYPES)}"
        )
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    check_exportable(model, file_type)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        _add_hparams(writer, model, file_type, name=path.stem)
        _add_tokenizer(writer, model.config.vocab_size, chat)
        for tensor_name, data, raw_dtype in _tensors(model, file_type):
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_exportable(model: GPT, file_type: str) -> None:
    """Raise GGUFError for a model that llama.cpp could not run as we do."""
    config = model.config
    positions = model.transformer.wpe.weight.size(0)
    if positions != config.block_size:
        raise GGUFError(
            f"the model's context (block_size={config.block_size}) does not match its position "
            f"table ({positions} rows); llama.cpp takes the context from the table's length. "
            "Fix block_size in model.json or re-save the model"
        )
    if config.vocab_size < TOKENIZER_SIZE:
        raise GGUFError(
            f"vocab_size {config.vocab_size} cannot hold GPT-2's tokenizer with the chat tokens "
            f"({TOKENIZER_SIZE} ids); only models with the GPT-2 vocabulary export"
        )
    if file_type == "q8_0" and config.n_embd % 32:
        raise GGUFError(
            f"q8_0 quantizes rows in blocks of 32 values; n_embd={config.n_embd} is not a "
            "multiple of 32. Export f16 or f32 instead"
        )


def _add_hparams(writer, model: GPT, file_type: str, name: str) -> None:
    config = model.config
    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(model.transformer.ln_f.eps)
    writer.add_file_type(FILE_TYPES[file_type])
    if file_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, vocab_size: int, chat: bool) -> None:
    vocab, merges = gpt2_vocab_and_merges()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for text, i in SPECIAL_TOKENS.items():
        tokens[i], types[i] = text, gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{left} {right}" for left, right in merges])
    writer.add_bos_token_id(SPECIAL_TOKENS[EOT])
    writer.add_eos_token_id(SPECIAL_TOKENS[EOT])
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat:
        writer.add_eot_token_id(SPECIAL_TOKENS[END])
        writer.add_chat_template(CHAT_TEMPLATE)


def _tensors(model: GPT, file_type: str):
    """(GGUF name, numpy data, ggml type or None) for every tensor llama.cpp's gpt2 loads."""
    names = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
    layer_names = {
        "ln_1": "attn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    for i in range(model.config.n_layer):
        names.update({f"h.{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in layer_names.items()})
    for module_name, gguf_name in names.items():
        module = model.transformer.get_submodule(module_name)
        for kind in ("weight", "bias"):
            if isinstance(module, torch.nn.Embedding) and kind == "bias":
                continue
            param = getattr(module, kind)
            if param is None:  # bias=False models: llama.cpp's gpt2 needs every bias; 0 is exact
                param = torch.zeros(module.weight.size(0))
            data = param.detach().to(device="cpu", dtype=torch.float32).numpy()
            if data.ndim == 1 or gguf_name == "position_embd" or file_type == "f32":
                yield f"{gguf_name}.{kind}", data, None
            elif file_type == "f16":
                yield f"{gguf_name}.{kind}", data.astype(np.float16), None
            else:
                qtype = gguf.GGMLQuantizationType.Q8_0
                yield f"{gguf_name}.{kind}", gguf.quants.quantize(data, qtype), qtype


def llama_cpp_plain_buffers():
    """A context in which llama-cpp-python's `Llama()` loads without llama.cpp's extra CPU buffer
    types (AMX, repacked weights), as llama-server's --no-repack: on some AMX CPUs its AMX q8_0
    matmul segfaults (ggml-org/llama.cpp#20824). The plain kernels compute the same model;
    `Llama()` has no argument for it, so its default model parameters are patched."""
    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    return mock.patch.object(
        llama_cpp.llama_cpp, "llama_model_default_params", without_extra_buffers
    )
