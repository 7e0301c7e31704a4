"""Translation data (stream format, leak-free split), greedy decoding with a state, BLEU/chrF."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bdh import BDH, BDHConfig
from bdh.baseline import GPT, GPTConfig
from bdh.translation import (
    build_stream,
    evaluate,
    format_example,
    group_pairs,
    read_pairs,
    score,
    split_pairs,
    translate,
    write_dataset,
)

EXAMPLE = re.compile(r"<F:(en|fr)>([^\n<]+)<T:(en|fr)>([^\n<]+)\n")

# A toy corpus with the shape of the real one: one English sentence with several French
# translations, one French sentence shared by two English ones.
PAIRS = [
    ("Hi.", "Salut !"),
    ("Hello.", "Salut !"),
    ("Hello.", "Bonjour !"),
    ("I am cold.", "J'ai froid."),
    ("I'm cold.", "J'ai froid."),
    ("Thank you.", "Merci."),
    ("Thanks.", "Merci !"),
    ("Go.", "Va !"),
    ("Run!", "Cours !"),
    ("Run!", "Courez !"),
    ("Who?", "Qui ?"),
    ("Wow!", "Ça alors !"),
]


def many_pairs(n: int = 400) -> list[tuple[str, str]]:
    """Synthetic pairs; every 3rd English sentence has a second translation."""
    pairs = [(f"sentence {i}.", f"phrase {i}.") for i in range(n)]
    pairs += [(f"sentence {i}.", f"autre phrase {i}.") for i in range(0, n, 3)]
    return pairs


# -------------------------------------------------------------------- stream format
def test_example_and_stream_format():
    assert format_example("Hi.", "Salut !", "en", "fr") == "<F:en>Hi.<T:fr>Salut !\n"
    stream = build_stream(PAIRS, seed=3)
    examples = EXAMPLE.findall(stream)
    assert "".join(f"<F:{a}>{b}<T:{c}>{d}\n" for a, b, c, d in examples) == stream
    assert len(examples) == len(PAIRS)
    as_pairs = {(b, d) if a == "en" else (d, b) for a, b, c, d in examples}
    assert as_pairs == set(PAIRS)  # every pair once, whichever direction it was written in
    assert all({a, c} == {"en", "fr"} for a, _, c, _ in examples)


def test_direction_is_random_per_pair_and_seeded():
    pairs = many_pairs()
    a, b, c = build_stream(pairs, seed=0), build_stream(pairs, seed=0), build_stream(pairs, seed=1)
    assert a == b and a != c
    directions = [src for src, *_ in EXAMPLE.findall(a)]
    share = directions.count("en") / len(directions)
    assert 0.4 < share < 0.6
    one_way = EXAMPLE.findall(build_stream(pairs, seed=0, both=False))
    assert {src for src, *_ in one_way} == {"en"}


# -------------------------------------------------------------------- reading and splitting
def test_read_pairs_and_one_line_errors(tmp_path):
    good = tmp_path / "pairs.tsv"
    good.write_text("Hi.\tSalut !\nWow!\tÇa alors !\n", encoding="utf-8")
    assert read_pairs(good) == [("Hi.", "Salut !"), ("Wow!", "Ça alors !")]
    assert read_pairs(good, limit=1) == [("Hi.", "Salut !")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("Hi.\tSalut !\nno tab here\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected") as err:
        read_pairs(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not found"):
        read_pairs(tmp_path / "missing.tsv")


def test_groups_join_pairs_that_share_a_sentence_on_either_side():
    groups = {frozenset(g) for g in map(tuple, group_pairs(PAIRS))}
    assert frozenset([("Hi.", "Salut !"), ("Hello.", "Salut !"), ("Hello.", "Bonjour !")]) in groups
    assert frozenset([("Go.", "Va !")]) in groups
    assert sum(len(g) for g in groups) == len(PAIRS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_has_no_source_leakage_in_either_direction(seed):
    pairs = many_pairs() + PAIRS
    splits = split_pairs(pairs, valid_fraction=0.1, test_fraction=0.1, seed=seed)
    assert sorted(splits.train + splits.valid + splits.test) == sorted(pairs)
    seen = {s for a, b in splits.train for s in (("en", a), ("fr", b))}
    for held_out in (splits.valid, splits.test):
        assert held_out
        assert not {("en", a) for a, _ in held_out} & seen
        assert not {("fr", b) for _, b in held_out} & seen
    assert abs(len(splits.test) / len(pairs) - 0.1) < 0.02
    assert split_pairs(pairs, 0.1, 0.1, seed) == splits  # deterministic


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="test_fraction"):
        split_pairs(PAIRS, test_fraction=1.5)
    with pytest.raises(ValueError, match="leave pairs for training"):
        split_pairs(PAIRS, valid_fraction=0.5, test_fraction=0.5)


def test_write_dataset(tmp_path):
    counts = write_dataset(many_pairs(), tmp_path, seed=0, valid_fraction=0.1, test_fraction=0.1)
    assert counts["train"] + counts["valid"] + counts["test"] == len(many_pairs())
    train = (tmp_path / "train.txt").read_text(encoding="utf-8")
    assert len(EXAMPLE.findall(train)) == counts["train"]
    assert len(read_pairs(tmp_path / "test.tsv")) == counts["test"]


# -------------------------------------------------------------------- greedy decoding
class Upcaser(nn.Module):
    """A stand-in model whose greedy "translation" is the source in capitals, then a newline
    (or `tail` bytes instead of the newline). It keeps the history in its state, like a cache."""

    def __init__(self, tail: bytes = b"\n") -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace()
        self.tail = tail
        self.steps = 0

    def init_state(self, batch_size: int) -> list[list[int]]:
        return [[] for _ in range(batch_size)]

    def step(self, idx: torch.Tensor, state: list[list[int]]) -> tuple[torch.Tensor, list]:
        self.steps += 1
        logits = torch.zeros(idx.shape[0], idx.shape[1], 256)
        for b, row in enumerate(state):
            row.extend(idx[b].tolist())
            text = bytes(row)
            source = text[text.index(b">") + 1 : text.index(b"<T:")]
            answer = source.upper() + self.tail + b"garbage"
            done = len(text) - text.index(b"<T:") - len(b"<T:fr>")
            logits[b, -1, answer[done]] = 1.0
        return logits, state


def test_translate_stops_at_the_delimiter_and_decodes_utf8():
    model = Upcaser()
    out = translate(model, ["où est-il ?", "hi.", "ok."], "fr", "en")
    assert out == ["Où EST-IL ?", "HI.", "OK."]  # bytes.upper() leaves the multi-byte ù alone


def test_translate_stops_at_a_marker_when_the_newline_is_missing():
    assert translate(Upcaser(tail=b"<F:en>"), "abc") == ["ABC"]
    # ... and at the byte budget when there is neither.
    assert translate(Upcaser(tail=b"xyz"), "abc", max_new_bytes=5) == ["ABCxy"]


def test_translate_batches_equal_length_prompts_and_reads_each_prompt_once():
    model = Upcaser()
    out = translate(model, ["abc", "def", "ghi"], batch_size=8)
    assert out == ["ABC", "DEF", "GHI"]
    assert model.steps == 1 + len("ABC\n") - 1  # one prefill, then one step per byte


@pytest.mark.parametrize("kind", ["bdh", "gpt"])
def test_translate_with_real_models_batched_equals_one_by_one(kind):
    torch.manual_seed(0)
    if kind == "bdh":
        model = BDH(BDHConfig.from_name("tiny")).eval()
    else:
        model = GPT(GPTConfig.from_name("tiny", position="alibi")).eval()
    texts = ["I am cold.", "You are hot", "Who?", "Wow!"]
    batched = translate(model, texts, max_new_bytes=12)
    singles = [translate(model, t, max_new_bytes=12)[0] for t in texts]
    assert batched == singles


def test_translate_respects_a_learned_position_limit():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", block_size=40)).eval()
    text = "a sentence, 22 bytes."  # the prompt is 32 bytes: 8 are left for the translation
    assert len(translate(model, text, max_new_bytes=50)[0].encode()) <= 8
    with pytest.raises(ValueError, match="block_size"):  # a prompt that does not fit is an error
        translate(model, text * 2)


# -------------------------------------------------------------------- scoring
def test_score_perfect_and_partial_with_variable_references():
    # BLEU needs 4-gram matches, so the toy sentences have at least four words.
    refs = [
        ["Salut tout le monde !", "Bonjour à tous !"],
        ["J'ai très froid ce matin."],
        ["Merci pour ton aide."],
    ]
    perfect = score(["Bonjour à tous !", "J'ai très froid ce matin.", "Merci pour ton aide."], refs)
    assert perfect == {"bleu": 100.0, "chrf": 100.0}
    partial = score(
        ["Bonjour tout le monde !", "J'ai froid ce matin.", "Merci pour ton aide."], refs
    )
    assert 0 < partial["bleu"] < 100 and 0 < partial["chrf"] < 100
    with pytest.raises(ValueError, match="one non-empty reference list"):
        score(["a"], [])


def test_evaluate_end_to_end_with_a_perfect_stand_in():
    pairs = [("one two three four.", "ONE TWO THREE FOUR."), ("a b c d e", "A B C D E")]
    pairs.append(("a b c d e", "a b c d e"))
    result = evaluate(Upcaser(), pairs, limit=None)
    assert result["bleu"] == 100.0 and result["chrf"] == 100.0
    assert result["sentences"] == 2 and result["direction"] == "en->fr"


def test_tatoeba_split_has_no_leakage(shared_data):
    pairs = read_pairs(shared_data / "tatoeba_eng_fra.tsv", limit=20000)
    splits = split_pairs(pairs, 0.02, 0.02, seed=0)
    train_en = {a for a, _ in splits.train}
    train_fr = {b for _, b in splits.train}
    assert not any(a in train_en or b in train_fr for a, b in splits.test)
