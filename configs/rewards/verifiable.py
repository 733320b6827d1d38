"""Verifiable rewards for configs/rl-verifiable-demo-cpu.toml, in TRL's signature
`f(prompts, completions, **kwargs) -> list[float]`: each prompt's record carries the `word` the
reply should repeat; the reward is the share of the reply's words that are that word (0 to 1)."""

from __future__ import annotations


def repeats_the_word(prompts, completions, word, **kwargs) -> list[float]:
    scores = []
    for completion, wanted in zip(completions, word, strict=True):
        words = completion.lower().replace(".", " ").replace(",", " ").split()
        scores.append(sum(w == wanted for w in words) / max(1, len(words)))
    return scores
