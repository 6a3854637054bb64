"""lm_pretrain.tokenizer.bpe: training a byte-level BPE, the tokenizer file, and its encoding (tokenizer.py)."""

import json
import random

import pytest

from lm_pretrain.tokenizer import bpe
from lm_pretrain.utils.errors import UserError
from lm_pretrain.tokenizer.encoding import EOT_TEXT, encoding_from_ranks, from_saved, get_tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog. " * 20, "To be, or not to be: that is the question. " * 20,
        "def add(a, b):\n    return a + b  # 2024\n" * 20, "Über Straße naïve café — 東京 😀 " * 10,
        "12345 67890 " * 30]


@pytest.fixture(scope="module")
def play() -> str:
    from lm_pretrain.utils import assets

    return sorted(assets.shakespeare_texts())[0].read_text(encoding="utf-8")  # ~130 KB



@pytest.fixture(scope="module")
def ranks(play):
    return bpe.train([play, *TEXT], 400)


def random_text(rng: random.Random, n: int) -> str:
    """Unicode scalar values of every plane (no lone surrogates: they have no UTF-8), with runs of
    whitespace, digits, ASCII and the end-of-text string among them."""
    pieces = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            pieces.append(rng.choice(["the ", "  ", "\n", "\r\n", "\t", " 123", "4567", "'s", "<|endoftext|>", "!!"]))
        elif kind < 0.6:
            pieces.append(chr(rng.randrange(0x20, 0x7F)))
        else:
            code = rng.choice([rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000), rng.randrange(0x4E00, 0x9FFF),
                               rng.randrange(0x1F300, 0x1FAFF)])
            pieces.append(chr(code))
    return "".join(pieces)


def test_ranks_start_with_the_bytes_and_each_later_one_is_one_merge(ranks):
    assert len(ranks) == 400 and ranks[:256] == [bytes([b]) for b in range(256)] and len(set(ranks)) == 400
    merges = bpe.merges({token: i for i, token in enumerate(ranks)})
    assert len(merges) == 400 - 256 and all(a + b == ranks[256 + i] for i, (a, b) in enumerate(merges))
    assert b" the" in ranks or b"the" in ranks  # learnt from the text


def test_both_trainers_learn_nearly_the_same_tokens(play):
    """rustbpe and Hugging Face tokenizers run the same algorithm on the same pieces: nearly the same
    vocabulary (they break ties between equally frequent pairs in other orders, which matters only
    among rare pairs; on Shakespeare's train split the sets are equal, BENCHMARKS.md) and the same
    compression."""
    pytest.importorskip("tokenizers")
    half = len(play) // 2
    ours, theirs = bpe.train([play[:half]], 1000, "rustbpe"), bpe.train([play[:half]], 1000, "hf")
    assert len(ours) == len(theirs) == 1000 and ours[:256] == theirs[:256]
    assert len(set(ours) & set(theirs)) >= 0.95 * 1000
    held_out = play[half:]
    a, b = (len(encoding_from_ranks(r, bpe.SPLIT_PATTERN, "x").encode_ordinary(held_out)) for r in (ours, theirs))
    assert abs(a - b) / a < 0.01


def test_decode_of_encode_is_the_text_for_any_unicode_string(ranks):
    enc = encoding_from_ranks(ranks, bpe.SPLIT_PATTERN, "test")
    rng = random.Random(0)
    for _ in range(300):
        text = random_text(rng, rng.randrange(0, 60))
        ids = enc.encode_ordinary(text)
        assert enc.decode(ids) == text and enc.decode_bytes(ids) == text.encode()
        assert enc.eot_token not in ids  # ordinary text, also "<|endoftext|>" written in it, is never the special id
        assert all(0 <= i < len(ranks) for i in ids)


def test_the_end_of_text_id_comes_after_the_ranks_and_separates_documents(ranks):
    enc = encoding_from_ranks(ranks, bpe.SPLIT_PATTERN, "test")
    assert enc.eot_token == len(ranks) == enc.n_vocab - 1
    assert enc.encode(EOT_TEXT, allowed_special="all") == [len(ranks)]
    first, second = enc.encode_ordinary("To be."), enc.encode_ordinary("Or not.")
    assert enc.decode(first + [enc.eot_token] + second) == f"To be.{EOT_TEXT}Or not."


def test_digits_split_in_pairs_and_merges_never_cross_words(ranks):
    digits = bpe.train(["12345 " * 100, "fox jumps " * 100], 300)  # every pair repeats: all merge what they may
    enc = encoding_from_ranks(digits, bpe.SPLIT_PATTERN, "test")
    assert [enc.decode([i]) for i in enc.encode_ordinary("12345")] == ["12", "34", "5"]
    assert not any(sum(c.isdigit() for c in t.decode(errors="replace")) > 2 for t in digits)
    assert [enc.decode([i]) for i in enc.encode_ordinary("fox jumps")] == ["fox", " jumps"]
    assert not any(b"x j" in t or b"s1" in t or b" 1" in t for t in digits)


def test_a_file_round_trips_and_its_sha256_is_the_files(ranks, tmp_path):
    import hashlib

    path = tmp_path / "tok.json"
    sha = bpe.write(path, ranks, "mine", {"documents": 4})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == bpe.digest(bpe.read_raw(path))
    loaded = bpe.read(path)
    assert loaded["ranks"] == ranks and loaded["name"] == "mine" and loaded["special_tokens"] == {EOT_TEXT: 400}
    enc, copy = get_tokenizer(str(path)), from_saved(json.loads(path.read_text()))
    text = "To be, or not to be 😀"
    assert enc.encode_ordinary(text) == copy.encode_ordinary(text) == \
        encoding_from_ranks(ranks, bpe.SPLIT_PATTERN, "x").encode_ordinary(text)


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw.update(format="other"), "does not say format"),
    (lambda raw: raw.update(version=2), "version 2"),
    (lambda raw: raw["ranks"].__setitem__(3, raw["ranks"][4]), "a token repeats"),
    (lambda raw: raw.update(special_tokens={}), "special tokens"),
    (lambda raw: raw["ranks"].__setitem__(300, "!!not base64!!"), "not a tokenizer file"),
    (lambda raw: raw.pop("pattern"), "pattern"),
])
def test_a_damaged_file_is_one_line(ranks, tmp_path, damage, message):
    path = tmp_path / "tok.json"
    bpe.write(path, ranks, "mine", {})
    raw = json.loads(path.read_text())
    damage(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=message) as err:
        get_tokenizer(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_what_is_not_a_tokenizer_file_is_one_line(tmp_path):
    (tmp_path / "x.json").write_text("not json")
    with pytest.raises(UserError, match="not JSON"):
        get_tokenizer(str(tmp_path / "x.json"))
    with pytest.raises(UserError, match="does not exist"):
        get_tokenizer(str(tmp_path / "none.json"))
    with pytest.raises(UserError, match="too small"):
        bpe.train(TEXT, 100)
