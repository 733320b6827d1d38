"""Hugging Face interop, checked against transformers itself: import, export, tokenizer, template."""

from __future__ import annotations

import hashlib
import json
import lzma
from importlib import resources

import pytest
import torch
from safetensors.torch import load_file

from minigpt.checkpoints import CheckpointError, load_model, save_model
from minigpt.interop.hf import EXPORT_VOCAB_SIZE, HFError, export_hf, from_pretrained
from minigpt.interop.hf_tokenizer import CHAT_TEMPLATE
from minigpt.model import GPT, GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE
from minigpt.tokenizer import get_tokenizer

from conftest import TOKENIZER_CASES, tiny_config

transformers = pytest.importorskip("transformers")

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris.\nIt has been since 987."},
    {"role": "user", "content": "  And of  Italy? 🦙 <|END|> is a token"},
]


def text_batch(length: int = 48, rows: int = 4) -> torch.Tensor:
    """Real text: windows of the bundled Shakespeare corpus."""
    with lzma.open(resources.files("minigpt.assets").joinpath("shakespeare.jsonl.xz")) as f:
        text = json.loads(f.readline())["text"]
    ids = get_tokenizer().encode(text[:20_000])
    return torch.tensor([ids[i * 997 : i * 997 + length] for i in range(rows)])


def render_reference(messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The chat format spec, written out: <|USER|>/<|ASSISTANT|> turns each closed by <|END|>,
    content as plain text; a leading system message joins the first user turn as "system\\n\\n"."""
    tok = get_tokenizer()
    ids, system = [], None
    for message in messages:
        if message["role"] == "system":
            system = message["content"]
            continue
        if system is not None and message["role"] == "user":
            ids += [tok.user_id, *tok.encode(system + "\n\n" + message["content"]), tok.end_id]
        else:
            if system is not None:
                ids += [tok.user_id, *tok.encode(system), tok.end_id]
            role = tok.user_id if message["role"] == "user" else tok.assistant_id
            ids += [role, *tok.encode(message["content"]), tok.end_id]
        system = None
    if system is not None:
        ids += [tok.user_id, *tok.encode(system), tok.end_id]
    return ids + [tok.assistant_id] * add_generation_prompt


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A randomly initialised GPT2LMHeadModel of an unusual shape, saved by transformers."""
    directory = tmp_path_factory.mktemp("hf-gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_head=3, n_embd=96, n_positions=128)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A tiny GPT after a few optimizer steps on real text (so no weight is at its init)."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = text_batch(33)
    for _ in range(5):
        _, loss = model(batch[:, :-1], batch[:, 1:].contiguous())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(directory, model, step=5)
    return directory


@pytest.fixture(scope="module")
def exported(trained_checkpoint, tmp_path_factory):
    from conftest import run_minigpt

    out = tmp_path_factory.mktemp("export") / "model"
    run_minigpt("export", "hf", trained_checkpoint, out)
    return out


def test_import_matches_transformers_logits(hf_dir):
    reference = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = from_pretrained(str(hf_dir)).eval()
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (3, 3, 96)
    assert model.config.block_size == 128 and model.config.vocab_size == PADDED_VOCAB_SIZE
    batch = text_batch()
    with torch.no_grad():
        ours = model(batch)[0][..., :GPT2_VOCAB_SIZE]
        theirs = reference(batch).logits
    assert (ours - theirs).abs().max() <= 1e-4


def test_import_pytorch_bin_and_openai_key_names(hf_dir, tmp_path):
    """pytorch_model.bin through weights_only loading, with the unprefixed keys and mask buffers
    of OpenAI's own hub files."""
    state = load_file(str(hf_dir / "model.safetensors"))
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    from_bin = load_model(tmp_path)  # the generic entry point takes HF directories too
    from_safetensors = from_pretrained(str(hf_dir))
    for key, value in from_safetensors.state_dict().items():
        assert torch.equal(value, from_bin.state_dict()[key]), key


def test_new_rows_are_the_mean_text_token(hf_dir):
    wte = from_pretrained(str(hf_dir)).transformer.wte.weight.detach()
    mean = wte[:GPT2_VOCAB_SIZE].mean(0)
    assert torch.allclose(wte[GPT2_VOCAB_SIZE:], mean.expand_as(wte[GPT2_VOCAB_SIZE:]))


def test_import_export_import_is_lossless(hf_dir, tmp_path):
    first = from_pretrained(str(hf_dir))
    export_hf(first, tmp_path)
    second = from_pretrained(str(tmp_path))
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    original = load_file(str(hf_dir / "model.safetensors"))
    exported = load_file(str(tmp_path / "model.safetensors"))
    for key, value in original.items():
        if key.endswith("wte.weight"):
            assert torch.equal(exported[key][:GPT2_VOCAB_SIZE], value)
        elif not key.endswith((".attn.bias", ".attn.masked_bias")):
            assert torch.equal(exported[key], value), key


def test_export_loads_in_transformers_with_equal_logits(trained_checkpoint, exported):
    ours = load_model(trained_checkpoint).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    assert theirs.config.vocab_size == EXPORT_VOCAB_SIZE == 50260
    batch = text_batch()
    with torch.no_grad():
        diff = ours(batch)[0][..., :EXPORT_VOCAB_SIZE] - theirs(batch).logits
    assert diff.abs().max() <= 1e-4
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [50256, 50259]


def test_exported_tokenizer_matches_ours(exported):
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    texts = (TOKENIZER_CASES / "cases.inp").read_text(encoding="utf-8")
    texts = texts.split("\n__ggml_vocab_test__\n")[:-1]
    expected = (TOKENIZER_CASES / "cases.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == 46
    for text, line in zip(texts, expected, strict=False):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [
            int(i) for i in line.split()
        ], repr(text)
        assert tokenizer.decode(get_tokenizer().encode(text)) == text
    assert len(tokenizer) == EXPORT_VOCAB_SIZE
    assert tokenizer.convert_tokens_to_ids(["<|USER|>", "<|ASSISTANT|>", "<|END|>"]) == [
        50257,
        50258,
        50259,
    ]


def test_slow_tokenizer_files_are_openais(exported):
    """vocab.json and merges.txt, derived from our ranks, are byte for byte OpenAI's encoder.json
    and vocab.bpe (the sha256s tiktoken pins, recorded in tests/data/gpt2-tokenizer-cases)."""
    digests = {
        "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    }
    for name, digest in digests.items():
        assert hashlib.sha256((exported / name).read_bytes()).hexdigest() == digest, name


def test_exported_chat_template_renders_our_format(exported):
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    clean = [{**m, "content": m["content"].replace("<|END|>", "END")} for m in CONVERSATION]
    for messages in (clean, clean[1:]):
        for prompt in (False, True):
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert ids == render_reference(messages, prompt)
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_chat_template_matches_render_conversation(exported):
    render = get_tokenizer().render_conversation
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    messages = [{**m, "content": m["content"].replace("<|END|>", "END")} for m in CONVERSATION]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    ids = render(messages, max_tokens=10_000).ids
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == list(ids)
    for lone_system in (
        [CONVERSATION[0]],
        [CONVERSATION[0], {"role": "assistant", "content": "Hi"}],
    ):
        text = hf_tokenizer.apply_chat_template(lone_system, tokenize=False)
        expected = render(lone_system, max_tokens=10_000).ids
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == list(expected)


def test_bfloat16_export(trained_checkpoint, tmp_path):
    from conftest import run_minigpt

    run_minigpt("export", "hf", trained_checkpoint, tmp_path / "bf16", "--dtype", "bfloat16")
    state = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.config.vocab_size == EXPORT_VOCAB_SIZE


def test_export_refuses_non_empty_directory(trained_checkpoint, tmp_path, cli):
    (tmp_path / "keep.txt").write_text("mine")
    result = cli("export", "hf", trained_checkpoint, tmp_path, check=False)
    assert result.returncode == 2 and "not empty" in result.stderr


def test_non_gpt2_config_names_the_architecture(tmp_path, cli):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFError, match="LlamaForCausalLM is not GPT-2"):
        from_pretrained(str(tmp_path))
    result = cli("eval", "hellaswag", "--model", tmp_path, "--data", tmp_path, check=False)
    assert result.returncode == 2 and "LlamaForCausalLM" in result.stderr


def test_weights_that_do_not_match_config(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 192}))
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    with pytest.raises(HFError, match=r"weights do not match config.json: shape mismatches"):
        from_pretrained(str(tmp_path))


def test_checkpoint_whose_shapes_do_not_match_its_config(trained_checkpoint, tmp_path):
    meta = json.loads((trained_checkpoint / "model.json").read_text())
    meta["config"]["n_embd"] = 64
    (tmp_path / "model.json").write_text(json.dumps(meta))
    (tmp_path / "model.safetensors").write_bytes(
        (trained_checkpoint / "model.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model(tmp_path)


def test_unknown_name_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HFError, match="downloading it from the Hugging Face hub failed"):
        from_pretrained("no-such-user/no-such-model")
    with pytest.raises(HFError, match="not a Hugging Face hub model name"):
        from_pretrained(str(tmp_path / "missing dir!"))


def test_imported_model_scores_hellaswag_as_transformers_does(hf_dir):
    from test_hellaswag import official_rows

    from minigpt.evals.hellaswag import hellaswag
    from minigpt.evals.multiple_choice import predict

    examples = [hellaswag(row) for row in official_rows(8)]
    ours = predict(from_pretrained(str(hf_dir)), examples, "cpu")
    theirs = predict(transformers.GPT2LMHeadModel.from_pretrained(hf_dir), examples, "cpu")
    for a, b in zip(ours, theirs, strict=True):
        assert (a.pred, a.pred_norm, a.tokens) == (b.pred, b.pred_norm, b.tokens)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
