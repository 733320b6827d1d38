import pytest

from minigpt.tokenizer import SPECIAL_TOKENS, get_tokenizer

from conftest import TOKENIZER_CASES


def load_cases():
    texts = (
        (TOKENIZER_CASES / "cases.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    )
    expected = (TOKENIZER_CASES / "cases.out").read_text(encoding="utf-8").split("\n")
    texts = texts[:-1]  # the text after the last separator is not a case
    return list(
        zip(texts, [[int(t) for t in line.split()] for line in expected[: len(texts)]], strict=True)
    )


CASES = load_cases()


def test_there_are_46_cases():
    assert len(CASES) == 46


@pytest.mark.parametrize("text,ids", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_reference_cases(text, ids):
    tok = get_tokenizer()
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_batch_encoding_matches_single():
    tok = get_tokenizer()
    texts = [text for text, _ in CASES]
    assert tok.encode_batch(texts, num_threads=4) == [ids for _, ids in CASES]


def test_special_ids():
    tok = get_tokenizer()
    assert (tok.eot_id, tok.user_id, tok.assistant_id, tok.end_id) == (50256, 50257, 50258, 50259)
    assert tok.n_vocab == 50260
    assert tok.special_id("<|END|>") == 50259
    assert tok.decode([tok.user_id, 15496, tok.end_id]) == "<|USER|>Hello<|END|>"


@pytest.mark.parametrize("name", list(SPECIAL_TOKENS))
def test_special_token_strings_in_text_stay_plain_text(name):
    tok = get_tokenizer()
    ids = tok.encode(f"say {name} now")
    assert not set(ids) & set(SPECIAL_TOKENS.values())
    assert tok.decode(ids) == f"say {name} now"


@pytest.mark.parametrize(
    "text",
    [
        "naïve café — résumé",
        "日本語のテキスト、中文，한국어",
        "emoji 🦙🚀👩‍👩‍👧‍👦 and flags 🇫🇷",
        "   leading, \t\ttabs, trailing   \n\n\n  ",
        "mixed\r\nline\rendings\n",
        "x" * 5000,
        "",
        "\u200b zero width and \ufffd replacement",
    ],
)
def test_round_trips(text):
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_packaged_ranks_are_gpt2s_byte_level_bpe():
    import minigpt.tokenizer as t

    ranks = t.load_gpt2_ranks()
    assert len(ranks) == 50256  # 256 bytes + 50,000 merges; <|endoftext|> is special
    assert sorted(ranks.values()) == list(range(50256))
    assert all(ranks[bytes([b])] < 256 for b in range(256))
    assert ranks[b"Hello"] == 15496 and ranks[b" world"] == 995


def test_corrupt_asset_is_refused(monkeypatch):
    import gzip

    import minigpt.tokenizer as t

    class FakeFile:
        def read_bytes(self):
            return gzip.compress(b"SGVsbG8= 0\n")

    class FakeFiles:
        def joinpath(self, name):
            return FakeFile()

    monkeypatch.setattr(t.resources, "files", lambda pkg: FakeFiles())
    with pytest.raises(t.TokenizerAssetError, match="expected 306cd27f"):
        t.load_gpt2_ranks()
