"""Benchmark tasks: loaders on the real offline data and on hub-schema fixtures, scores against an
independent one-example-at-a-time reference, batch-size invariance, autocast."""

from __future__ import annotations

import json

import pytest
import torch

from minigpt.evals import multiple_choice
from minigpt.evals.data import EvalDataError
from minigpt.evals.tasks import TASKS, get_task, parse_tasks
from minigpt.model import GPT, GPT2_VOCAB_SIZE
from minigpt.tokenizer import get_tokenizer

from conftest import tiny_config

# (rows in the split, first example: context, continuations, gold), read by hand from the files
FIRST_ROWS = {
    "hellaswag": (10042, "Roof shingle removal: A man is sitting on a roof. He",
                  (" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                   " is holding a rubik's cube.", " starts pulling up roofing on a roof."), 3),
    "arc_easy": (570, "Question: Which technology was developed most recently?\nAnswer:",
                 (" cellular telephone", " television", " refrigerator", " airplane"), 0),
    "arc_challenge": (299, None, (" Put the objects in groups.", " Change the height of the ramp.",
                      " Choose different objects to roll.",
                      " Record the details of the investigation."), 3),
    "openbookqa": (500, "Frilled sharks and angler fish live far beneath the surface of the "
                   "ocean, which is why they are known as",
                   (" Deep sea animals", " fish", " Long Sea Fish", " Far Sea Animals"), 0),
    "copa": (100, "The man turned on the faucet therefore",
             ("  the toilet filled with water.", "  water flowed from the spout."), 1),
    "sciq": (1000, "\nQuestion: Who proposed the theory of evolution by natural selection?\n"
             "Answer:", (" Linnaeus", " shaw", " Scopes", " darwin"), 3),
    "social_iqa": (1954, "Q: Tracy didn't go home that evening and resisted Riley's attacks. "
                   "What does Tracy need to do before this?\nA:",
                   (" make a new plan", " Go home and see Riley", " Find somewhere to go"), 2),
    "commonsense_qa": (1221, "Question: A revolving door is convenient for two direction "
                       "travel, but it also serves as a security measure at a what?\nA. bank\n"
                       "B. library\nC. department store\nD. mall\nE. new york\nAnswer:",
                       (" A", " B", " C", " D", " E"), 0),
    "mmlu": (14042, "The following are multiple choice questions (with answers) about abstract "
             "algebra.\n\nFind the degree for the given field extension Q(sqrt(2), sqrt(3), "
             "sqrt(18)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:", (" A", " B", " C", " D"), 1),
}  # fmt: skip


@pytest.fixture(scope="module")
def offline(eval_data_dir):
    """Every task's full offline split, loaded once."""
    return {name: task.load(data_dir=eval_data_dir) for name, task in TASKS.items()}


@pytest.mark.parametrize("name", list(FIRST_ROWS))
def test_offline_first_rows(offline, name):
    count, context, continuations, gold = FIRST_ROWS[name]
    loaded = offline[name]
    assert (len(loaded.examples), loaded.skipped) == (count, 0)
    first = loaded.examples[0]
    if context is not None:
        assert set(first.contexts) == {context}
    assert (first.continuations, first.gold) == (continuations, gold)
    assert loaded.source.startswith("offline:")


def test_offline_first_rows_of_the_other_tasks(offline):
    piqa = offline["piqa"].examples[0]
    assert len(offline["piqa"].examples) == 1838 and piqa.gold == 0
    assert (
        piqa.contexts[0]
        == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    assert piqa.continuations[0].startswith(" Provide the guinea pig with a cage full of a few")
    assert "ripped paper strips" in piqa.continuations[0]
    assert "ripped jeans material" in piqa.continuations[1]
    wino = offline["winogrande"].examples[0]
    assert len(offline["winogrande"].examples) == 1267 and wino.gold == 1
    assert wino.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")  # fmt: skip
    assert wino.continuations == (" always got the easier cases.",) * 2
    boolq = offline["boolq"].examples[0]
    assert len(offline["boolq"].examples) == 3270 and boolq.gold == 0  # answer False
    assert boolq.contexts[0].startswith("All biomass goes through at least some of these steps")
    assert boolq.contexts[0].endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert boolq.continuations == (" no", " yes")
    five = offline["mmlu_5shot"].examples[0].contexts[0]
    assert five.startswith("The following are multiple choice questions (with answers) about "
                           "abstract algebra.\n\nFind all c in Z_3")  # fmt: skip
    assert five.count("\nAnswer: ") == 5 and five.endswith(FIRST_ROWS["mmlu"][1].split("\n\n")[1])
    assert len(offline["mmlu_5shot"].examples) == 14042


# ------------------------------------------------------------------- fixtures in the hub schema
HUB_ROWS = {
    "hellaswag": {"ind": 7, "activity_label": "Baking", "ctx_a": "A man mixes.", "ctx_b": "he",
                  "ctx": "A man mixes. he", "endings": ["bakes.", "sings.", "runs.", "sits."],
                  "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"},
    "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
    "arc_easy": {"id": "q1", "question": "What is wet?", "answerKey": "2",
                 "choices": {"text": ["water", "sand", "dust"], "label": ["1", "2", "3"]}},
    "arc_challenge": {"id": "q2", "question": "What is hot?", "answerKey": "B",
                      "choices": {"text": ["ice", "fire"], "label": ["A", "B"]}},
    "winogrande": {"sentence": "Ann gave Bo a gift because _ was kind.", "option1": "Ann",
                   "option2": "Bo", "answer": "1"},
    "openbookqa": {"id": "o", "question_stem": "The sun is a", "answerKey": "A",
                   "choices": {"text": ["star", "moon"], "label": ["A", "B"]}},
    "boolq": {"question": "is water wet", "passage": "Water is wet.", "answer": True},
    "copa": {"premise": "It rained.", "choice1": "The grass got wet.", "choice2": "It was dry.",
             "question": "effect", "idx": 3, "label": 0},
    "commonsense_qa": {"id": "c", "question": "Where is a fish?", "question_concept": "fish",
                       "choices": {"label": list("ABCDE"), "text": list("abcde")},
                       "answerKey": "E"},
    "sciq": {"question": "What is H2O?", "distractor1": "salt", "distractor2": "air",
             "distractor3": "sand", "correct_answer": "water", "support": "  Water is H2O."},
    "social_iqa": {"context": "Kai ate.", "question": "Why?", "answerA": "hungry",
                   "answerB": "sad", "answerC": "tired", "label": "1"},
    "mmlu": {"question": "2+2?", "subject": "elementary_mathematics",
             "choices": ["1", "2", "3", "4"], "answer": 3},
    "mmlu_5shot": {"question": "2+3?", "subject": "elementary_mathematics",
                   "choices": ["5", "2", "3", "4"], "answer": 0},
}  # fmt: skip
EXPECTED = {  # (first context, continuations, gold) of each fixture row, written out by hand
    "hellaswag": ("Baking: A man mixes. He", (" bakes.", " sings.", " runs.", " sits."), 0),
    "piqa": ("Question: Open a jar\nAnswer:", (" twist the lid", " eat the lid"), 0),
    "arc_easy": ("Question: What is wet?\nAnswer:", (" water", " sand", " dust"), 1),
    "arc_challenge": ("Question: What is hot?\nAnswer:", (" ice", " fire"), 1),
    "winogrande": ("Ann gave Bo a gift because Ann", (" was kind.", " was kind."), 0),
    "openbookqa": ("The sun is a", (" star", " moon"), 0),
    "boolq": ("Water is wet.\nQuestion: is water wet?\nAnswer:", (" no", " yes"), 1),
    "copa": ("It rained therefore", ("  the grass got wet.", "  it was dry."), 0),
    "commonsense_qa": ("Question: Where is a fish?\nA. a\nB. b\nC. c\nD. d\nE. e\nAnswer:",
                       (" A", " B", " C", " D", " E"), 4),
    "sciq": ("Water is H2O.\nQuestion: What is H2O?\nAnswer:",
             (" salt", " air", " sand", " water"), 3),
    "social_iqa": ("Q: Kai ate. Why?\nA:", (" hungry", " sad", " tired"), 0),
    "mmlu": ("The following are multiple choice questions (with answers) about elementary "
             "mathematics.\n\n2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:",
             (" A", " B", " C", " D"), 3),
}  # fmt: skip


@pytest.mark.parametrize("name", [n for n in TASKS if n != "mmlu_5shot"])
def test_hub_schema_fixture_and_malformed_rows_counted(tmp_path, name):
    row = HUB_ROWS[name]
    broken = {
        k: v for k, v in row.items() if k not in ("label", "answer", "answerKey", "correct_answer")
    }
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (row, broken, row)))
    loaded = get_task(name).load(path)
    assert (len(loaded.examples), loaded.skipped) == (2, 1)
    assert loaded.problem.startswith(f"{path}: row 2: missing field")
    first = loaded.examples[0]
    assert (first.contexts[0], first.continuations, first.gold) == EXPECTED[name]


def test_mmlu_5shot_local_questions_take_shots_from_the_dev_split(tmp_path, eval_data_dir):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(json.dumps(HUB_ROWS["mmlu_5shot"]) + "\n")
    (example,) = get_task("mmlu_5shot").load(path, eval_data_dir).examples
    context = example.contexts[0]
    assert context.count("\nAnswer: ") == 5 and context.endswith(
        "\n\n2+3?\nA. 5\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert "about elementary mathematics.\n\n" in context and example.gold == 0


def test_no_usable_rows_and_unknown_task(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"foo": 1}\n')
    with pytest.raises(EvalDataError, match=r"piqa: no usable examples .*1 malformed.*row 1"):
        get_task("piqa").load(path)
    with pytest.raises(Exception, match="unknown task 'nope'"):
        parse_tasks("piqa,nope")
    assert parse_tasks("all") == list(TASKS)


# ------------------------------------------------------------------------------------- scores
def reference_scores(logits_fn, example, block_size: int) -> list[tuple[float, int]]:
    """(sum of log-probs, tokens) per choice: each `context + continuation` alone through the
    plain forward, encoded whole and split where the context's own tokens end, cut from the
    left to block_size + 1 tokens."""
    tok = get_tokenizer()
    out = []
    for context, continuation in zip(example.contexts, example.continuations, strict=True):
        context_ids = tok.encode(context)
        continuation_ids = tok.encode(context + continuation)[len(context_ids) :]
        tokens = (context_ids + continuation_ids)[-(block_size + 1) :]
        n = min(len(continuation_ids), len(tokens) - 1)
        with torch.no_grad():
            logits = logits_fn(torch.tensor([tokens[:-1]]))[0, :, :GPT2_VOCAB_SIZE].float()
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(tokens[1:])
        picked = logp[torch.arange(len(targets)), targets][-n:]
        out.append((picked.sum().item(), n))
    return out


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)


@pytest.fixture(scope="module")
def sample(offline):
    """A few real examples of every task (the long ones get cut to the tiny model's context)."""
    return {name: loaded.examples[:3] for name, loaded in offline.items()}


def tiny_transformers_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("kind", ["transformers", "minigpt"])
def test_every_task_matches_the_one_at_a_time_reference(sample, kind, one_thread):
    if kind == "transformers":
        model = tiny_transformers_gpt2()
        logits_fn, block = (lambda t: model(t).logits), 64
    else:
        torch.manual_seed(0)
        model = GPT(tiny_config()).eval()
        logits_fn, block = (lambda t: model(t)[0]), model.config.block_size
    for name, examples in sample.items():
        predictions = multiple_choice.predict(model, examples, "cpu", batch_size=4)
        for example, p in zip(examples, predictions, strict=True):
            ref = reference_scores(logits_fn, example, block)
            logprobs = [lp for lp, _ in ref]
            assert p.logprobs == pytest.approx(logprobs, abs=1e-4), name
            assert p.tokens == [n for _, n in ref], name
            assert p.pred == argmax(logprobs), name
            norm = [lp / c for lp, c in zip(logprobs, example.lengths, strict=True)]
            assert p.pred_norm == argmax(norm), name
            assert p.pred_per_token == argmax([lp / n for lp, n in ref]), name


def test_batch_size_never_changes_a_score(sample, one_thread):
    torch.manual_seed(1)
    model = GPT(tiny_config()).eval()
    examples = [ex for exs in sample.values() for ex in exs[:3]]
    one = multiple_choice.predict(model, examples, "cpu", batch_size=1)
    many = multiple_choice.predict(model, examples, "cpu", batch_size=13)
    for a, b in zip(one, many, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert (a.pred, a.pred_norm, a.pred_per_token, a.tokens) == (
            b.pred, b.pred_norm, b.pred_per_token, b.tokens,
        )  # fmt: skip
    counts = multiple_choice.tally(one, examples)
    assert counts == multiple_choice.tally(many, examples)


def test_scoring_under_the_trainers_autocast(sample, one_thread):
    torch.manual_seed(2)
    model = GPT(tiny_config()).eval()
    examples = sample["hellaswag"] + sample["arc_easy"]
    exact = multiple_choice.predict(model, examples, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = multiple_choice.predict(model, examples, "cpu")
    for a, b in zip(exact, low, strict=True):
        assert all(isinstance(x, float) for x in b.logprobs)
        assert b.logprobs == pytest.approx(a.logprobs, rel=0.02, abs=0.1)
