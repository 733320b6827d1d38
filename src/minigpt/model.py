"""GPT-2, exactly: the model of Radford et al. (2019), in the layout of OpenAI's checkpoints.

References: OpenAI's gpt-2 `model.py` (TensorFlow), Hugging Face `modeling_gpt2.py`, and
Karpathy's nanoGPT / build-nanogpt. Parameter names follow the Hugging Face layout
(`transformer.h.0.attn.c_attn.weight` ...) so importing and exporting is a transpose, not a rename.

Contract: `GPT.forward(idx, targets=None)` returns `(logits, loss)`. Without targets: the logits
and None. With targets (training, validation loss): None and the mean cross-entropy over targets
that are not -100 (`IGNORE_INDEX`), computed by `head_loss.linear_cross_entropy` in row chunks so
that the (B, T, V) logits are never materialised; call without targets when you need logits.
Inference and scoring add keyword arguments (positions, a key-padding mask or any attention mask,
a key/value cache, last-position-only logits); without them the forward is the plain causal
training forward. `GPT.hidden_states` is the same forward without the head. The model knows the
cache only through the `AttentionCache` methods it calls: the cache itself, with its row
bookkeeping, is the engine's (`minigpt.engine.KVCache`). Loading weights is not the model's
either: `minigpt.checkpoints` and `minigpt.interop.hf` build a GPT and fill it.
The vocabulary is padded to a multiple of 64 (50,304) for fast matmuls; padded rows are ordinary
parameters that training pushes down, and the engine masks them at sampling time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.head_loss import head_cross_entropy, linear_cross_entropy

IGNORE_INDEX = -100
GPT2_VOCAB_SIZE = 50257  # OpenAI's BPE: 50,000 merges + 256 bytes + <|endoftext|>
PADDED_VOCAB_SIZE = 50304  # 50,257 rounded up to a multiple of 64; room for the chat tokens

# Shapes only; everything else comes from GPTConfig's defaults.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # small presets for CPU smoke tests, learning and the demo
    "gpt2-mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2-micro": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "gpt2-nano": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum sequence length (rows of the position embedding)
    vocab_size: int = PADDED_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has them

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A named preset (see PRESETS) with any field overridden, e.g. block_size=2048."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**data)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale = True  # scaled init per GPT-2 paper
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: AttentionCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """mask: None for plain causal attention, else a (B|1, 1, T, S) mask over the S keys
        (cached + new): bool "may attend", or float added to the scores (SDPA's two kinds).
        kv_cache: where this layer's earlier keys live."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        # no mask: causal when the queries are the whole sequence; a single query (a decode
        # step) sees every key, and is_causal would wrongly align it with the first key
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None and T > 1
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: AttentionCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, kv_cache, layer)  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


def padding_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """The (B, 1, T, T) "may attend" mask of a left-padded batch without a cache: causal, and
    only to real tokens (key_mask (B, T), True on them).

    Queries on padding see themselves too: a row with every key masked would make SDPA return
    NaN, and a padding position's output is never used anyway.
    """
    T = key_mask.size(1)
    q_pos = torch.arange(T, device=key_mask.device)[:, None]
    k_pos = torch.arange(T, device=key_mask.device)[None, :]
    mask = ((k_pos <= q_pos) & key_mask[:, None, :]) | (k_pos == q_pos)
    return mask.unsqueeze(-3)


class AttentionCache(Protocol):
    """What the forward needs of a key/value cache (`minigpt.engine.KVCache` is the one we
    have): the model hands each layer's new keys to it and never builds one itself."""

    def begin(self, T: int) -> tuple[int, torch.Tensor | None]:
        """Before the layers: (one past the last key position, the attention mask or None)."""
        ...

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) position ids of the T new tokens."""
        ...

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the layer's new (B, H, T, D) keys and values; return all of its (B, H, S, D)."""
        ...

    def advance(self, T: int) -> None:
        """After the layers: the rows grew by T tokens."""
        ...


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_scale", False):
                std *= (2 * self.config.n_layer) ** -0.5  # residual projections, GPT-2 paper
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        pos: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: AttentionCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx, targets: (B, T) int64 with T <= block_size. Returns (logits (B, T, V), None)
        without targets, (None, loss) with them. The keyword arguments are `hidden_states`'s."""
        x = self.hidden_states(
            idx,
            pos=pos,
            key_mask=key_mask,
            attn_mask=attn_mask,
            kv_cache=kv_cache,
            last_only=last_only,
        )
        if targets is None:
            return self.lm_head(x), None
        hidden, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        if not isinstance(self.lm_head, nn.Linear):  # int8 (minigpt.quantize): no weight to read
            vocab = self.config.vocab_size
            return None, head_cross_entropy(hidden, self.lm_head, vocab, targets, IGNORE_INDEX)
        return None, linear_cross_entropy(hidden, self.lm_head.weight, targets, IGNORE_INDEX)

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        pos: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: AttentionCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The final LayerNorm's output (B, T, C), what the head reads: for the scoring core,
        reward heads, and `forward`.

        All optional: pos (B, T) position ids, for rows whose text starts later than column 0
        (default 0..T-1, or each cache row's length onward; callers passing `pos` keep it below
        block_size); key_mask (B, T) bool, True on real tokens of a left-padded batch; attn_mask
        (B|1, 1, T, T), bool ("may attend") or float (added to the attention scores), for any
        other layout, such as several sequences packed in one row; kv_cache, whose selected rows
        this call attends to and extends by T (see `AttentionCache`); last_only keeps the last
        position only, (B, 1, C). key_mask and attn_mask are for forwards without a cache.
        """
        if (key_mask is not None) + (attn_mask is not None) + (kv_cache is not None) > 1:
            raise ValueError("key_mask, attn_mask and kv_cache are alternatives: pass one")
        T = idx.size(1)
        if kv_cache is not None:
            end, mask = kv_cache.begin(T)
        else:
            end = T
            mask = padding_mask(key_mask) if key_mask is not None else attn_mask
        if pos is None:
            if end > self.config.block_size:
                raise ValueError(
                    f"sequence of {end} tokens is longer than the context (block_size="
                    f"{self.config.block_size}); truncate it or use a model with a longer context"
                )
            pos = (
                kv_cache.positions(T)
                if kv_cache is not None
                else torch.arange(T, device=idx.device)
            )
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.transformer.ln_f(x)

    def init_rows_to_mean(self, rows: range) -> None:
        """Set embedding rows `rows` (tied to the head) to the mean of all rows before them.

        For fine-tuning a pre-trained GPT-2 that lacks new tokens (the chat tokens 50257..50259):
        the mean embedding starts them where the model is unsurprised, not as random noise that
        the tied head would turn into arbitrary logits.
        """
        if not 0 < rows.start <= rows.stop <= self.config.vocab_size:
            raise ValueError(
                f"rows {rows} are outside the vocabulary (1..{self.config.vocab_size})"
            )
        with torch.no_grad():
            wte = self.transformer.wte.weight
            wte[rows.start : rows.stop] = wte[: rows.start].mean(dim=0)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied head is the embedding). non_embedding drops wpe,
        the convention of the GPT-2 / Chinchilla papers for scaling laws."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token: 6N plus attention's 12·L·C·T
        (PaLM paper, appendix B), with N the non-embedding parameters."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T


def state_dict_mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """Why `state` cannot load into a model whose state dict is `expected`; "" when it can."""
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if not (mismatched or missing or unexpected):
        return ""
    return f"shape mismatches {mismatched}, missing {missing}, unexpected {unexpected}"


@contextmanager
def weights_left_uninitialized() -> Iterator[None]:
    """Build modules without drawing their initial weights, for a model whose every weight is
    loaded next: random init of GPT-2 124M costs over a second of CPU at each load. (The way
    transformers' `no_init_weights` does it.)"""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
