"""vLLM's tokenizer endpoints: what /tokenize, /detokenize and /tokenizer_info answer.

lm-evaluation-harness's `local-completions` model finds them (it probes /tokenizer_info for an
`eos_token`, then /tokenize) and tokenizes through the server instead of loading tokenizer files,
sending token-id prompts to /v1/completions. As Hugging Face tokenizers do (and so vLLM), the
named special tokens in a text given to /tokenize become their ids ("<|endoftext|>" is 50256):
that is how lm-eval learns the end-of-text id. Text prompts sent to /v1 stay plain text.
"""

from __future__ import annotations

from minigpt.tokenizer import EOT, Tokenizer

# our chat format (minigpt.tokenizer) as a Jinja template, for clients that render chats
# themselves: a system message joins the next user message after a blank line, else stands alone
# as a user turn
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}"
    "{%- elif m['role'] == 'user' -%}"
    "<|USER|>{% if ns.system %}{{ ns.system }}\n\n{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] }}<|END|>"
    "{%- else -%}"
    "{% if ns.system %}<|USER|>{{ ns.system }}<|END|>{% set ns.system = '' %}{% endif %}"
    "<|ASSISTANT|>{{ m['content'] }}<|END|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{% if ns.system %}<|USER|>{{ ns.system }}<|END|>{% endif %}"
    "{%- if add_generation_prompt -%}<|ASSISTANT|>{%- endif -%}"
)


def tokenizer_info(tokenizer: Tokenizer, max_model_len: int) -> dict:
    """/tokenizer_info: the fields of a Hugging Face tokenizer config that clients read."""
    return {
        "tokenizer_class": "GPT2TokenizerFast",
        "eos_token": EOT,
        "bos_token": EOT,
        "unk_token": EOT,
        "pad_token": None,
        "model_max_length": max_model_len,
        "vocab_size": tokenizer.n_vocab,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
