"""A reward model: the GPT-2 trunk and a scalar head read at each sequence's last real token.

The layout is transformers' `GPT2ForSequenceClassification` with one label: the trunk's
parameters keep GPT-2's names and the head is `score.weight` (n_embd -> 1, no bias), so export is
the GPT-2 export plus one matrix. `RewardModel` is a `GPT` (the language-model head stays, tied to
the embedding as always, so a reward model trains, checkpoints and resumes like any run) whose
forward returns rewards instead of logits. Sequences are right-padded: under the causal mask a real
token never sees the padding after it, so the reward of a padded row is the reward of the row alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minigpt.model import GPT, GPTConfig, weights_left_uninitialized

REWARD_HEAD = "reward"  # model.json "head" of a reward model's checkpoint


class RewardModel(GPT):
    head = REWARD_HEAD

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.score = nn.Linear(config.n_embd, 1, bias=False)
        # TRL's value-head scale: rewards start near 0 with unit-order gradients to the trunk
        nn.init.normal_(self.score.weight, std=(config.n_embd + 1) ** -0.5)

    @classmethod
    def from_language_model(cls, model: GPT) -> RewardModel:
        """A reward model on `model`'s trunk (copied) with a freshly initialised head."""
        with weights_left_uninitialized():
            reward_model = cls(model.config)
        head = torch.empty_like(reward_model.score.weight)
        nn.init.normal_(head, std=(model.config.n_embd + 1) ** -0.5)
        reward_model.load_state_dict({**model.state_dict(), "score.weight": head})
        return reward_model.to(model.transformer.wte.weight.device)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """idx (B, T) right-padded ids, lengths (B,) real tokens per row -> (B,) fp32 rewards."""
        hidden = self.hidden_states(idx)
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        return self.score(last).squeeze(-1).float()


def collate_sequences(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and (B,) lengths of whole sequences to score."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
    return ids, lengths
