"""Preference pairs: HH-RLHF and TRL parsing, offline pairs, rendering with truncation, batches."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from minigpt.data.chat import ChatDataError, load_conversations
from minigpt.data.preference import (
    PreferencePair,
    RenderedPair,
    collate_pairs,
    load_preferences,
    mismatched_pairs,
    render_pairs,
)
from minigpt.model import IGNORE_INDEX
from minigpt.tokenizer import get_tokenizer

FIXTURES = Path(__file__).parent / "data" / "chat"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_hh_rlhf_pairs_split_on_turn_markers_and_count_bad_rows():
    result = load_preferences(str(FIXTURES / "hh-rlhf-pairs.jsonl"), "hh-rlhf")
    assert result.pairs == [
        PreferencePair([user("What is a good name for a cat?")], "How about Whiskers?", "Dog."),
        # replies sharing their first words keep them: no character-level common prefix
        PreferencePair(
            [user("My head hurts a lot.")],
            "I think you should see a doctor if it keeps hurting.",
            "I think you should ignore it.",
        ),
        # a reply that is a prefix of the other stays whole
        PreferencePair([user("How do I open a locked door?")], "Sure.", "Sure. Kick it in."),
        PreferencePair(
            [user("Hi!"), assistant("Hello! How can I help?"), user("Tell me a fact about owls.")],
            "Owls can turn their heads about 270 degrees.",
            "Owls are fish.",
        ),
    ]
    assert result.skipped == Counter(
        {
            "prompts differ": 1,
            "empty turn": 1,
            "Human/Assistant turns do not alternate": 1,
            "does not end with an Assistant turn": 1,
            "'chosen' missing or not a string": 1,
            "not a JSON object": 2,  # a broken JSON line and a JSON list
            "chosen and rejected replies are identical": 1,
        }
    )
    assert "4 preference pairs" in result.summary() and "8 records skipped" in result.summary()


def test_trl_pairs_from_strings_message_lists_and_implicit_prompts(tmp_path):
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
        # UltraFeedback: chosen/rejected repeat the prompt before the reply
        {
            "prompt": "Name a colour.",
            "chosen": [user("Name a colour."), assistant("Blue.")],
            "rejected": [user("Name a colour."), assistant("Seven.")],
        },
        # TRL's implicit prompt: no "prompt" key
        {
            "chosen": [user("A"), assistant("B"), user("C"), assistant("good")],
            "rejected": [user("A"), assistant("B"), user("C"), assistant("bad")],
        },
        {"prompt": "x", "chosen": [user("y"), assistant("z")], "rejected": "w"},
        {"prompt": "x", "chosen": [user("x")], "rejected": "w"},
        {"prompt": "x", "chosen": "y"},
        {"prompt": "x", "chosen": [{"role": "robot", "content": "y"}], "rejected": "z"},
        {"prompt": [assistant("I start")], "chosen": "y", "rejected": "z"},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = load_preferences(str(path), "trl")
    assert result.pairs == [
        PreferencePair([user("2+2?")], "4", "5"),
        PreferencePair([user("Hi")], "Hello!", "Go away."),
        PreferencePair([user("Name a colour.")], "Blue.", "Seven."),
        PreferencePair([user("A"), assistant("B"), user("C")], "good", "bad"),
    ]
    assert result.skipped == Counter(
        {
            "prompts differ": 1,
            "'chosen' does not end with an assistant message": 1,
            "'rejected' is not a string or a non-empty message list": 1,
            "a 'chosen' message without a known role and string content": 1,
            "user/assistant turns do not alternate from the user": 1,
        }
    )


def test_offline_pairs_pair_a_real_reply_with_another_conversations():
    conversations = load_conversations(str(FIXTURES / "messages.jsonl"), "messages").conversations
    conversations += [
        [user(f"Q{i}"), assistant(f"A{i}"), user("more"), assistant(f"B{i}")] for i in range(6)
    ]
    pairs = mismatched_pairs(conversations, seed=3)
    assert pairs == mismatched_pairs(conversations, seed=3)  # seeded
    assert pairs != mismatched_pairs(conversations, seed=4)
    replies = {m["content"] for c in conversations for m in c if m["role"] == "assistant"}
    for pair, conversation in zip(pairs, conversations, strict=True):
        cut = len(pair.prompt)
        assert pair.prompt == conversation[:cut] and pair.prompt[-1]["role"] == "user"
        assert pair.chosen == conversation[cut]["content"]
        assert pair.rejected in replies and pair.rejected != pair.chosen
        assert pair.rejected not in [m["content"] for m in conversation]
    # two conversations answering the same way give no pair, counted
    skipped = Counter()
    same = [[user("a"), assistant("hi")], [user("b"), assistant("hi")]]
    assert mismatched_pairs(same, seed=0, skipped=skipped) == []
    assert skipped == Counter({"chosen and rejected replies are identical": 2})


def test_shuffled_offline_pairs_reject_the_real_replys_words_in_another_order():
    conversations = [
        [user(f"Q{i}"), assistant(f"I would like {i} cups of tea please")] for i in range(5)
    ]
    conversations.append([user("Q"), assistant("Yes.")])  # one word: no other order
    skipped = Counter()
    pairs = mismatched_pairs(conversations, seed=0, skipped=skipped, rejected="shuffled")
    assert len(pairs) == 5 and skipped == Counter({"chosen and rejected replies are identical": 1})
    for pair in pairs:
        assert pair.rejected != pair.chosen
        assert sorted(pair.rejected.split()) == sorted(pair.chosen.split())
    # the cut of each conversation is the one "other" pairs use: only the rejected reply differs
    others = mismatched_pairs(conversations, seed=0)
    assert [p.prompt for p in others[:5]] == [p.prompt for p in pairs]
    with pytest.raises(ChatDataError, match="data.rejected"):
        mismatched_pairs(conversations, seed=0, rejected="random")


def test_offline_pairs_from_the_chitchat_format():
    result = load_preferences(str(FIXTURES / "chitchat.json"), "chitchat", seed=1)
    assert result.format == "chitchat" and result.pairs
    assert "offline" in result.summary()


def test_unknown_format_names_the_choices(tmp_path):
    with pytest.raises(ChatDataError, match="hh-rlhf, trl, alpaca"):
        load_preferences(str(tmp_path / "x.jsonl"), "ultra")


def _ids(tok, messages):
    return tok.render_for_completion(messages)


def test_rendering_keeps_whole_turns_and_cuts_replies_last():
    tok = get_tokenizer()
    long_turns = [user("one two three four five " * 4), assistant("six seven eight " * 4)]
    prompt = [*long_turns, user("nine ten?")]
    pair = PreferencePair(prompt, "Yes.", "No, not at all.")
    fits = len(_ids(tok, prompt)) + len(tok.encode("No, not at all.")) + 1
    [whole], stats = render_pairs([pair], tok, fits)
    assert whole.prompt == _ids(tok, prompt) and stats.prompt_cut == stats.reply_cut == 0
    assert whole.prompt[-1] == tok.assistant_id
    assert whole.chosen == tok.encode("Yes.") + [tok.end_id]
    assert whole.rejected == tok.encode("No, not at all.") + [tok.end_id]
    # one token short: the prompt loses its first two turns (a turn boundary), replies stay whole
    [cut], stats = render_pairs([pair], tok, fits - 1)
    assert cut.prompt == _ids(tok, [user("nine ten?")]) and stats.prompt_cut == 1
    assert cut.rejected == whole.rejected and stats.reply_cut == 0
    # then replies are cut to the room left after the last user turn
    room = 3
    [short], stats = render_pairs([pair], tok, len(cut.prompt) + room)
    assert short.prompt == cut.prompt and short.rejected == whole.rejected[:room]
    assert short.chosen == whole.chosen and stats.reply_cut == 1
    # no room for a single reply token: dropped, counted
    kept, stats = render_pairs([pair], tok, len(cut.prompt))
    assert kept == [] and stats.dropped == 1


def test_collated_pairs_target_only_reply_tokens():
    tok = get_tokenizer()
    a = RenderedPair([1, 2, 3], [10, 11], [20], (-1.0, -2.0))
    b = RenderedPair([4, 5], [30], [40, 41, 42], (-3.0, -4.0))
    inputs, targets, reference = collate_pairs([a, b], pad_id=tok.eot_id)
    I, P = IGNORE_INDEX, tok.eot_id  # noqa: E741
    assert inputs.tolist() == [[1, 2, 3, 10], [4, 5, P, P], [1, 2, 3, P], [4, 5, 40, 41]]
    assert targets.tolist() == [[I, I, 10, 11], [I, 30, I, I], [I, I, 20, I], [I, 40, 41, 42]]
    assert torch.equal(reference, torch.tensor([-1.0, -3.0, -2.0, -4.0]))
    assert len(collate_pairs([a, b._replace(reference=None)], pad_id=0)) == 2
