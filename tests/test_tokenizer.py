import pytest
import requests
import tiktoken

from lm_pretrain.utils import assets
from lm_pretrain.tokenizer import encoding as tokenizer
from lm_pretrain.utils.errors import UserError
from lm_pretrain.tokenizer.encoding import get_tokenizer


@pytest.fixture(autouse=True)
def fresh_cache():
    tokenizer._named.cache_clear()
    yield
    tokenizer._named.cache_clear()


def test_gpt2_ids():
    enc = get_tokenizer("gpt2")
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.decode([15496, 995]) == "Hello world"


def offline(*args, **kwargs):
    raise requests.exceptions.ConnectionError("no network")


def test_offline_falls_back_to_local_ranks(monkeypatch):
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    enc = get_tokenizer("gpt2")
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    # the same ids as the normal path on a longer text, special token included
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler <|endoftext|>"
    monkeypatch.undo()
    tokenizer._named.cache_clear()
    assert enc.encode_ordinary(text) == get_tokenizer("gpt2").encode_ordinary(text)


def test_bpe_file_from_environment(monkeypatch):
    monkeypatch.setenv("LM_PRETRAIN_BPE_FILE", str(assets.gpt2_bpe_file()))
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    assert get_tokenizer("gpt2").encode_ordinary("Hello world") == [15496, 995]


def test_wrong_bpe_file_is_a_clear_error(monkeypatch, tmp_path):
    bad = tmp_path / "ranks.tiktoken"
    bad.write_text("SGVsbG8= 0\n")
    monkeypatch.setenv("LM_PRETRAIN_BPE_FILE", str(bad))
    with pytest.raises(UserError, match="not the GPT-2 ranks file"):
        get_tokenizer("gpt2")
    monkeypatch.setenv("LM_PRETRAIN_BPE_FILE", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="does not exist"):
        get_tokenizer("gpt2")


def test_no_bpe_anywhere_says_how_to_provide_it(monkeypatch):
    monkeypatch.setattr(tiktoken, "get_encoding", offline)

    def unavailable():
        raise UserError("could not download openai-whisper")

    monkeypatch.setattr(assets, "gpt2_bpe_file", unavailable)
    with pytest.raises(UserError) as err:
        get_tokenizer("gpt2")
    assert "LM_PRETRAIN_BPE_FILE" in str(err.value) and "\n" not in str(err.value)


def test_unknown_tokenizer():
    with pytest.raises(UserError, match="unknown tokenizer 'nope'"):
        get_tokenizer("nope")


def test_non_gpt2_offline_error(monkeypatch):
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="cl100k_base.*TIKTOKEN_CACHE_DIR"):
        tokenizer.get_tokenizer("cl100k_base")


def test_long_texts_tokenize_in_segments_as_a_whole():
    """Cut before a space between two other characters, the tokens are the whole text's, for GPT-2's
    split pattern and the own tokenizers' (GPT-4's); a run without such a space is cut at the limit."""
    import random

    import numpy as np

    from lm_pretrain.tokenizer import bpe
    from lm_pretrain.tokenizer.encoding import encode_document, encoding_from_ranks, segments

    rng = random.Random(0)
    pieces = ["the", "king", "  ", "\n", "\n\n", " ", "!", "12345", "don't", "\t", "caf\u00e9", "\u2014", "\u4e2d\u6587"]
    text = "".join(rng.choice(pieces) + rng.choice([" ", "", "  ", "\n", " \n"]) for _ in range(60_000))
    own = encoding_from_ranks(bpe.train([text], 600, "rustbpe"), bpe.SPLIT_PATTERN, "own")
    for enc in (get_tokenizer(), own):
        whole = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        assert len(text) > 2 * 65536 and np.array_equal(encode_document(enc, text), whole)
        for size in (1000, 4096):  # hundreds of cuts, each before a space between two other characters
            parts = list(segments(text, size))
            assert "".join(parts) == text and len(parts) > len(text) // size and max(map(len, parts)) <= size
            ends = np.cumsum([len(p) for p in parts])[:-1]
            assert all(text[e] == " " and not text[e - 1].isspace() and not text[e + 1].isspace() for e in ends)
            cut = np.concatenate([enc.encode_to_numpy(p, allowed_special=set(), disallowed_special=()) for p in parts])
            assert np.array_equal(cut, whole), (enc.name, size)
    assert [len(p) for p in segments("a" * 2500, 1000)] == [1000, 1000, 500]
