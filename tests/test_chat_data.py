"""Conversation loaders on fixtures in the real schemas, and SFT batch collation."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minigpt.data import chat
from minigpt.data.chat import ChatDataError, collate_sft, load_conversations, render_for_sft
from minigpt.model import GPT, IGNORE_INDEX
from tests.conftest import REPO, tiny_config

FIXTURES = REPO / "tests" / "data" / "chat"
CHITCHAT_WHEEL = Path("/tmp/dl/chitchat_dataset-0.9.0-py3-none-any.whl")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_hh_rlhf_parses_chosen_dialogues_and_counts_bad_rows():
    result = load_conversations(str(FIXTURES / "hh-rlhf.jsonl"), "hh-rlhf")
    assert result.conversations == [
        [user("What is a good name for a cat?"), assistant("How about Whiskers?")],
        [
            user("Can you help me bake bread?"),
            assistant("Sure. Do you have yeast?"),
            user("Yes, one packet."),
            assistant("Then mix it with warm water first."),
        ],
    ]
    assert result.skipped == {
        "empty turn": 1,
        "Human/Assistant turns do not alternate": 1,
        "does not end with an Assistant turn": 1,
        "'chosen' missing or not a string": 1,
        "not a JSON object": 1,  # the truncated last line
    }
    assert "2 conversations, 5 records skipped" in result.summary()


def test_alpaca_joins_instruction_and_optional_input():
    result = load_conversations(str(FIXTURES / "alpaca.json"), "alpaca")
    assert result.conversations == [
        [
            user("Give three tips for staying healthy."),
            assistant("1. Eat well.\n2. Exercise.\n3. Sleep."),
        ],
        [user("Translate to French.\n\nGood morning"), assistant("Bonjour")],
    ]
    assert result.skipped == {
        "'output' empty": 1,
        "'output' missing or not a string": 1,
        "not a JSON object": 1,
    }


def test_dolly_joins_instruction_and_optional_context():
    result = load_conversations(str(FIXTURES / "dolly.jsonl"), "dolly")
    assert result.conversations == [
        [
            user(
                "When did Virgin Australia start operating?\n\n"
                "Virgin Australia commenced services on 31 August 2000."
            ),
            assistant("On 31 August 2000."),
        ],
        [user("Which is a species of fish? Tope or Rope"), assistant("Tope")],
    ]
    assert result.skipped == {"'instruction' empty": 1, "'context' missing or not a string": 1}


def test_generic_messages_accept_openai_and_sharegpt_shapes():
    result = load_conversations(str(FIXTURES / "messages.jsonl"), "messages")
    assert result.conversations == [
        [{"role": "system", "content": "You are terse."}, user("2+2?"), assistant("4")],
        [user("Hi there"), assistant("Hello!"), user("Bye"), assistant("Goodbye.")],
    ]
    assert result.skipped == {
        "no assistant message": 1,
        "a message without a known role and string content": 1,
        "user/assistant turns do not alternate from the user": 1,
        "no 'messages' / 'conversations' list": 1,
    }


def test_chitchat_alternating_speakers_become_user_and_assistant():
    result = load_conversations(str(FIXTURES / "chitchat.json"), "chitchat")
    assert result.conversations == [
        [
            user("Hello\nHow are you doing today?"),
            assistant("whats up MD\nim doing good"),
            user("Yeah"),
        ],
        [user("first"), assistant("second")],
    ]
    assert result.skipped == {"only one speaker": 1, "more than two speakers": 1}


@pytest.mark.skipif(not CHITCHAT_WHEEL.exists(), reason="chitchat-dataset wheel not downloaded")
def test_chitchat_real_package_file(tmp_path, monkeypatch):
    with zipfile.ZipFile(CHITCHAT_WHEEL) as wheel:
        wheel.extract("chitchat_dataset/dataset.json", tmp_path)
        wheel.extract("chitchat_dataset/__init__.py", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = load_conversations("chitchat")
    # 7,168 conversations: 3,150 have a single speaker, one more once blank lines are dropped
    assert len(result.conversations) == 7168 - 3151
    assert result.skipped == {"only one speaker": 3151}
    assert all(c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in result.conversations)


def test_hub_names_load_through_datasets_with_their_format(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (FIXTURES / "dolly.jsonl").read_text().splitlines()]
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows[:2])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_conversations("databricks/databricks-dolly-15k", limit=1)
    assert calls == [("databricks/databricks-dolly-15k", "train")]
    assert result.format == "dolly" and len(result.conversations) == 1


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(ChatDataError, match="unknown or missing format"):
        load_conversations(str(FIXTURES / "alpaca.json"))
    with pytest.raises(ChatDataError, match="not a hub dataset name"):
        load_conversations(str(tmp_path / "missing.jsonl").replace(".jsonl", ""), "alpaca")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ChatDataError, match="not valid JSON"):
        load_conversations(str(tmp_path / "bad.json"), "alpaca")


def test_chitchat_not_installed_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(chat.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ChatDataError, match="pip install chitchat-dataset"):
        load_conversations("chitchat")


def test_collate_sft_targets_are_next_ids_where_mask_is_one():
    examples = [([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6, 7], [0, 1, 1])]
    inputs, targets = collate_sft(examples, pad_id=50256)
    assert inputs.tolist() == [[1, 2, 3], [5, 6, 50256]]
    assert targets.tolist() == [[IGNORE_INDEX, 3, 4], [6, 7, IGNORE_INDEX]]
    with pytest.raises(ChatDataError):
        collate_sft([([1], [1])], pad_id=0)


def test_render_for_sft_counts_what_truncation_costs():
    from minigpt.tokenizer import get_tokenizer

    tok = get_tokenizer()
    short = [user("Hi"), assistant("Hello")]  # 7 tokens
    long = short + [user("Tell me a long story about cats and dogs"), assistant("No")]
    too_long = [user("word " * 20), assistant("ok")]
    examples, stats = render_for_sft([short, long, too_long], tok, max_tokens=10)
    assert examples == [tok.render_conversation(short, 10)[:2]] * 2
    assert (stats.truncated, stats.dropped_messages, stats.left_out) == (1, 2 + 2, 1)


def test_model_loss_on_a_collated_batch_is_the_hand_computed_masked_cross_entropy():
    from minigpt.tokenizer import get_tokenizer

    tok = get_tokenizer()
    conversations = [
        [user("Hi"), assistant("Hello there."), user("Bye"), assistant("Bye!")],
        [user("What is 2+2?"), assistant("4")],
    ]
    examples = [tok.render_conversation(c, 64)[:2] for c in conversations]
    inputs, targets = collate_sft(examples, pad_id=tok.eot_id)
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    with torch.no_grad():
        logits, _ = model(inputs)
        _, loss = model(inputs, targets)
    # by hand: -log softmax at each (row, t) whose next token is a trained one
    terms = []
    for row, (ids, mask) in enumerate(examples):
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                terms.append(-F.log_softmax(logits[row, t].double(), dim=-1)[ids[t + 1]])
    n_trained = sum(sum(mask[1:]) for _, mask in examples)
    assert len(terms) == n_trained == int((targets != IGNORE_INDEX).sum())
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)
