"""Tokenizer: exact round-trips, fixed special ids, deterministic training, save/load."""
import pickle
import time
from pathlib import Path

import pytest
import torch

from engine.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"
SHAKESPEARE = DATA / "text_tinyshakespeare.txt"
WIKI = DATA / "text_wikitext2_valid.txt"

ROUND_TRIP = [
    "",
    "Hello, world!",
    "  two leading spaces, two trailing  ",
    "multiple     spaces\tand\ttabs\t\t",
    "\n",
    "\n\nnewlines\n\n\nand\r\nwindows\rline ends\n",
    "emoji 😀👍🏽 and CJK 中文字符 日本語 한국어",
    "never seen: ☃ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width \ufeff bom \x00 nul \x07 bell",
    "U+2581 is SentencePiece's space mark: ▁ ▁▁a▁b ▁",
    "digits 1234567890 3.14159",
    "<unk> <s> </s> <pad> look like specials but are text",
    "def f(x):\n    return x  # indented code\n",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(SHAKESPEARE, None, vocab_size=512)


def test_special_ids_and_size(tok):
    assert tok.vocab_size == len(tok) == 512
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    # "\n" is one piece (a user-defined symbol), not a byte-fallback token.
    assert [tok.id_to_piece(i) for i in tok.encode("\n")] == ["\n"]


@pytest.mark.parametrize("s", ROUND_TRIP)
def test_round_trip_exact(tok, s):
    ids = tok.encode(s)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert UNK_ID not in ids  # byte fallback, never <unk>
    assert tok.decode(ids) == s


def test_round_trip_real_text(tok):
    text = WIKI.read_text(encoding="utf-8")[:200_000]  # not the training text
    assert tok.decode(tok.encode(text)) == text


def test_learned_merges_compress(tok):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:50_000]
    assert len(tok.encode(text)) < 0.6 * len(text.encode("utf-8"))


def test_bos_eos_and_batch(tok):
    s = "Hello there"
    assert tok.encode(s, bos=True, eos=True) == [BOS_ID] + tok.encode(s) + [EOS_ID]
    assert tok.encode(s, eos=True)[-1] == EOS_ID and tok.encode(s)[0] != BOS_ID
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(s) for s in ROUND_TRIP]
    assert tok.encode_batch(["a", "▁b"], bos=True, eos=True) == [
        tok.encode("a", bos=True, eos=True), tok.encode("▁b", bos=True, eos=True)]
    assert tok.encode_batch([]) == []


def test_decode_skips_specials_and_accepts_tensors(tok):
    ids = tok.encode("Speak, speak.")
    assert tok.decode([BOS_ID] + ids + [EOS_ID, PAD_ID, PAD_ID]) == "Speak, speak."
    assert tok.decode(torch.tensor(ids)) == "Speak, speak."
    assert tok.decode_batch([ids, ids + [PAD_ID]]) == ["Speak, speak."] * 2


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match="id 512 out of range"):
        tok.decode([5, 512])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="expects str, got list"):
        tok.encode([1, 2])
    with pytest.raises(TypeError, match="item 1 is int"):
        tok.encode_batch(["a", 3])


def test_training_is_deterministic_and_input_form_independent(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    a = Tokenizer.train([text], None, vocab_size=400)
    b = Tokenizer.train(iter([text[:150_000], text[150_000:]]), None, vocab_size=400)
    f = tmp_path / "corpus.txt"
    f.write_text(text, encoding="utf-8")
    c = Tokenizer.train(str(f), None, vocab_size=400)
    assert a.model_proto == c.model_proto  # same text -> identical model bytes
    # Splitting the texts differently only moves a line break in one line; same pieces learned.
    assert b.encode(text[:5000]) == a.encode(text[:5000])
    d = Tokenizer.train([text], None, vocab_size=350)
    assert d.model_proto != a.model_proto and d.vocab_size == 350


def test_train_speed_two_corpora():
    # vocab 512 on ~2.2 MB must take seconds, not minutes (generous bound for a shared CPU).
    t0 = time.perf_counter()
    tok = Tokenizer.train([SHAKESPEARE, WIKI], None, vocab_size=512)
    assert time.perf_counter() - t0 < 20
    assert tok.vocab_size == 512


def test_save_load(tok, tmp_path):
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.model" and path.is_file()
    for src in (tmp_path / "tok", path, str(path)):
        t2 = Tokenizer.load(src)
        assert t2.model_proto == tok.model_proto
        assert t2.encode(ROUND_TRIP[6]) == tok.encode(ROUND_TRIP[6])
    t3 = pickle.loads(pickle.dumps(tok))
    assert t3.encode(ROUND_TRIP[8]) == tok.encode(ROUND_TRIP[8])


def test_train_writes_to_prefix_or_dir(tmp_path):
    text = "small corpus of words\nwith two lines\n" * 50
    Tokenizer.train([text], tmp_path / "spm", vocab_size=300)
    assert (tmp_path / "spm.model").is_file()
    (tmp_path / "d").mkdir()
    t = Tokenizer.train([text], tmp_path / "d", vocab_size=300)
    assert Tokenizer.load(tmp_path / "d").model_proto == t.model_proto
    assert t.vocab_size <= 300  # small corpus: smaller vocab, no error
    assert t.decode(t.encode("unseen ✓ text")) == "unseen ✓ text"


def test_load_and_train_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer model"):
        Tokenizer.load(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model: not a sentencepiece model"):
        Tokenizer.load(junk)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer.train(str(tmp_path / "nope.txt"), None, vocab_size=300)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer.train([tmp_path / "nope.txt"], None, vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size=270 is too small"):
        Tokenizer.train(SHAKESPEARE, None, vocab_size=270)
    with pytest.raises(ValueError, match="no training text"):
        Tokenizer.train([""], None, vocab_size=300)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: invalid UTF-8"):
        Tokenizer.train([bad], None, vocab_size=300)


def test_recipe_char_tokenizer_and_bad_type(tmp_path):
    """data.tokenizer_type=char trains one piece per character (round trip kept); an unknown
    type is a config error before anything is trained."""
    from engine.config import ConfigError
    from recipes import common, pretrain
    text = "Q: Reverse the letters b a d o.\nA: o d a b\n" * 50 + "To be, or not to be: that is the question.\n" * 50
    cfg = pretrain.PretrainConfig()
    cfg.data.tokenizer_type = "char"
    (tmp_path / "char").mkdir()  # recipes create their run folder first (common.setup)
    tok = common.tokenizer(cfg, str(tmp_path / "char"), lambda: [text])
    s = "Q: To be reversed?\nA: eb oT"
    ids = tok.encode(s)
    assert len(ids) == len(s) and tok.decode(ids) == s
    assert tok.vocab_size < 300  # 4 specials + 256 bytes + newline + the text's characters
    cfg.data.tokenizer_type = "wordpiece"
    with pytest.raises(ConfigError, match="tokenizer_type"):
        common.tokenizer(cfg, str(tmp_path / "bad"), lambda: [text])
    assert not (tmp_path / "bad" / "tokenizer.model").exists()
