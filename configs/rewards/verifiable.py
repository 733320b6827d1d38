"""Verifiable rewards for configs/rl-verifiable-demo-cpu.toml, in TRL's signature
`f(prompts, completions, **kwargs) -> list[float]`: each prompt's record carries the number of
`words` its reply should have; the reward is 1 / (1 + |words in the reply - that number|), 1 for
a reply of exactly that length and some credit for a near miss, so that every group of replies
carries a signal from the first step."""

from __future__ import annotations


def answers_in_n_words(prompts, completions, words, **kwargs) -> list[float]:
    return [1 / (1 + abs(len(c.split()) - n)) for c, n in zip(completions, words, strict=True)]
