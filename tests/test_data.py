"""engine.data: every reader's error messages (file, line, field), the real data files, and the
tokenized datasets (SFT masks, packing, ranking batches, pretraining token streams)."""
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import (DataError, TokenStream, collate_rankings, encode_rankings, encode_sft,
                         load_documents, load_prompts, load_rankings, load_sft, load_text, pack,
                         read_jsonl, render_messages, unflatten_groups)

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"
RANKINGS = DATA / "rankings_oasst_en.jsonl"
PAIRS = DATA / "pairs_hh_harmless_test.jsonl.gz"
SFT = DATA / "sft_selfinstruct_seed.jsonl"
PROMPTS = DATA / "prompts_selfinstruct_user_oriented.jsonl"


class CharTok:
    """One id per character (id = ord + 4), so expected ids are easy to write down."""
    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 300
    model_proto = b"chartok"

    def encode(self, s):
        return [ord(c) + 4 for c in s]

    def encode_batch(self, texts):
        return [self.encode(s) for s in texts]


def write(tmp_path, name, lines):
    """Write JSONL: dicts/lists are dumped, str lines are written verbatim."""
    p = tmp_path / name
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines),
                 encoding="utf-8")
    return p


def raises(fn, path, *parts):
    """Assert fn(path) raises DataError whose message holds the file name and every part."""
    with pytest.raises(DataError) as info:
        fn(path)
    msg = str(info.value)
    assert os.path.basename(str(path)) in msg, msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------- read_jsonl
def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    p = write(tmp_path, "a.jsonl", [{"x": 1}, "", "   ", {"x": 2}])
    assert list(read_jsonl(p)) == [(1, {"x": 1}), (4, {"x": 2})]


def test_read_jsonl_gz(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write('{"x": "é"}\n\n{"x": 2}\n')
    assert list(read_jsonl(p)) == [(1, {"x": "é"}), (3, {"x": 2})]


def test_read_jsonl_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert raises(lambda p: list(read_jsonl(p)), tmp_path / "empty.jsonl") == \
        f"{tmp_path / 'empty.jsonl'}: file is empty"
    raises(lambda p: list(read_jsonl(p)), write(tmp_path, "blank.jsonl", ["", " "]), "file is empty")
    raises(lambda p: list(read_jsonl(p)), write(tmp_path, "bad.jsonl", [{"a": 1}, {"a": 2}, '{"a": 3']),
           "bad.jsonl:3: invalid JSON")
    raises(lambda p: list(read_jsonl(p)), write(tmp_path, "list.jsonl", [{"a": 1}, [1, 2]]),
           "list.jsonl:2: expected a JSON object, got list")
    (tmp_path / "utf.jsonl").write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    raises(lambda p: list(read_jsonl(p)), tmp_path / "utf.jsonl", "utf.jsonl:2: invalid UTF-8")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    raises(lambda p: list(read_jsonl(p)), tmp_path / "bad.jsonl.gz", "corrupt gzip")


# ---------------------------------------------------------------------------- SFT
def test_load_sft_formats_and_template(tmp_path):
    p = write(tmp_path, "sft.jsonl", [
        {"prompt": "Hi", "response": "Hello", "extra": [1]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "3+3?"},
                      {"role": "assistant", "content": "6"}]},
    ])
    a, b = load_sft(p)
    assert a == {"prompt": "Hi", "response": "Hello"}
    assert b == {"prompt": "System: Be brief.\nUser: 2+2?\nAssistant: 4\nUser: 3+3?\nAssistant: ",
                 "response": "6"}
    assert render_messages([{"role": "prompter", "content": "q"}]) == "User: q"


@pytest.mark.parametrize("line, parts", [
    ({"prompt": "p"}, ["missing field 'response'"]),
    ({"response": "r"}, ["missing field 'prompt'"]),
    ({"prompt": "p", "response": 3}, ["field 'response' must be a string, got int"]),
    ({"prompt": None, "response": "r"}, ["field 'prompt' must be a string, got null"]),
    ({"messages": "hi"}, ["field 'messages' must be a list, got string"]),
    ({"messages": []}, ["field 'messages' must end with an assistant turn"]),
    ({"messages": [{"role": "user", "content": "q"}]}, ["'messages' must end with an assistant"]),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     ["field 'messages[1].role' is 'bot'", "assistant"]),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     ["field 'messages[0].content' must be a string, got int"]),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
     ["missing field 'messages[0].content'"]),
    ({"messages": [["user", "q"]]}, ["field 'messages[0]' must be an object, got list"]),
])
def test_load_sft_errors(tmp_path, line, parts):
    good = {"prompt": "p", "response": "r"}
    p = write(tmp_path, "data.jsonl", [good] * 6 + [line])
    raises(load_sft, p, "data.jsonl:7:", *parts)


# ---------------------------------------------------------------------------- rankings
def test_load_rankings_ranked_pairs_history(tmp_path):
    p = write(tmp_path, "rm.jsonl", [
        {"prompt": "q", "completions": ["a", "b", "c"], "ranking": [2, 0, 0]},  # ties allowed
        {"prompt": "P", "chosen": "good", "rejected": "bad"},
        {"prompt": "q2", "completions": ["x", "y"], "ranking": [1, 0], "history": [
            {"role": "prompter", "text": "q1"}, {"role": "assistant", "content": "a1"}]},
        {"prompt": "q3", "completions": ["x", "y"], "ranking": [0, 1], "history": []},
        {"prompt": "q", "completions": [str(i) for i in range(12)], "ranking": list(range(12))},
    ])
    r = load_rankings(p)
    assert r[0] == {"prompt": "q", "completions": ["a", "b", "c"], "ranking": [2, 0, 0]}
    assert r[1] == {"prompt": "P", "completions": ["good", "bad"], "ranking": [0, 1]}
    assert r[2]["prompt"] == "User: q1\nAssistant: a1\nUser: q2\nAssistant: "
    assert r[3]["prompt"] == "q3"  # empty history: prompt verbatim
    assert len(r[4]["completions"]) == 12  # K > 9 is accepted


@pytest.mark.parametrize("line, parts", [
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [0]},
     ["field 'ranking' has 1 entries but 'completions' has 2"]),
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [0, 2]},
     ["field 'ranking[1]' is 2, must be in [0, 1]"]),
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [-1, 0]}, ["field 'ranking[0]' is -1"]),
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [0, 1.0]},
     ["field 'ranking[1]' must be an int, got float"]),
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [True, False]},
     ["field 'ranking[0]' must be an int, got bool"]),
    ({"prompt": "q", "completions": ["a"], "ranking": [0]},
     ["field 'completions' needs at least 2 completions, got 1"]),
    ({"prompt": "q", "completions": [], "ranking": []}, ["needs at least 2 completions, got 0"]),
    ({"prompt": "q", "completions": ["a", 7], "ranking": [0, 1]},
     ["field 'completions[1]' must be a string, got int"]),
    ({"prompt": "q", "completions": "ab", "ranking": [0, 1]},
     ["field 'completions' must be a list, got string"]),
    ({"prompt": "q", "completions": ["a", "b"]}, ["missing field 'ranking'"]),
    ({"prompt": "q", "ranking": [0, 1]}, ["missing field 'completions'"]),
    ({"prompt": "q"}, ["missing field 'completions'", "'chosen'/'rejected'"]),
    ({"completions": ["a", "b"], "ranking": [0, 1]}, ["missing field 'prompt'"]),
    ({"prompt": "q", "chosen": "a"}, ["missing field 'rejected'"]),
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, ["field 'rejected' must be a string, got list"]),
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [0, 1],
      "history": [{"role": "assistant"}]}, ["missing field 'history[0].content'"]),
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [0, 1],
      "history": [{"role": "user", "text": 1}]}, ["field 'history[0].text' must be a string, got int"]),
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [0, 1],
      "history": [{"role": "narrator", "text": "x"}]}, ["field 'history[0].role' is 'narrator'"]),
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [0, 1], "history": "x"},
     ["field 'history' must be a list, got string"]),
])
def test_load_rankings_errors(tmp_path, line, parts):
    good = {"prompt": "q", "completions": ["a", "b"], "ranking": [1, 0]}
    p = write(tmp_path, "rank.jsonl", [good, {"prompt": "q", "chosen": "a", "rejected": "b"}, line])
    raises(load_rankings, p, "rank.jsonl:3:", *parts)


# ---------------------------------------------------------------------------- prompts / text
def test_load_prompts(tmp_path):
    assert load_prompts(write(tmp_path, "p.jsonl", [{"prompt": "a", "id": 1}, {"prompt": ""}])) == ["a", ""]
    raises(load_prompts, write(tmp_path, "p2.jsonl", [{"prompt": "a"}, {"text": "b"}]),
           "p2.jsonl:2: missing field 'prompt'")
    raises(load_prompts, write(tmp_path, "p3.jsonl", [{"prompt": {"a": 1}}]),
           "p3.jsonl:1: field 'prompt' must be a string, got object")


def test_load_text(tmp_path):
    t = tmp_path / "t.txt"
    t.write_bytes("line one\r\n\ttwo  ✓\n".encode())
    assert load_text(t) == "line one\r\n\ttwo  ✓\n"
    j = write(tmp_path, "docs.jsonl", [{"text": "doc a"}, {"text": "doc b", "meta": 1}])
    assert load_documents(j) == ["doc a", "doc b"] and load_text(j) == "doc a\n\ndoc b"
    raises(load_text, write(tmp_path, "d2.jsonl", [{"text": "a"}, {"text": 3}]),
           "d2.jsonl:2: field 'text' must be a string, got int")
    (tmp_path / "bad.txt").write_bytes(b"ok\nok\nbad \xc3\x28 here\n")
    raises(load_text, tmp_path / "bad.txt", "bad.txt:3: invalid UTF-8 at byte offset 10")
    (tmp_path / "e.txt").write_bytes(b"")
    raises(load_text, tmp_path / "e.txt", "file is empty")


# ---------------------------------------------------------------------------- real data
def test_real_files_load_with_provenance_counts():
    ranked, pairs = load_rankings(RANKINGS), load_rankings(PAIRS)
    assert len(ranked) == 329 and len(pairs) == 1803
    assert len(load_sft(SFT)) == 175 and len(load_prompts(PROMPTS)) == 252
    assert all(2 <= len(r["completions"]) <= 9 and sorted(set(r["ranking"])) == list(range(len(set(r["ranking"]))))
               for r in ranked)
    assert all(p["ranking"] == [0, 1] and p["prompt"].endswith("\n\nAssistant:") for p in pairs)
    # oasst histories ({"role", "text"}) are rendered with the chat template.
    assert any(r["prompt"].startswith("User: ") and r["prompt"].endswith("\nAssistant: ") for r in ranked)
    for name in ("text_tinyshakespeare.txt", "text_wikitext2_valid.txt"):
        assert len(load_text(DATA / name)) > 1_000_000


def _corrupt_copy(tmp_path, src, lineno, edit):
    lines = src.read_text(encoding="utf-8").splitlines()
    lines[lineno - 1] = edit(lines[lineno - 1])
    dst = tmp_path / src.name
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def _set(key, value):
    def edit(line):
        obj = json.loads(line)
        obj[key] = value
        return json.dumps(obj)
    return edit


def test_corrupted_real_copies(tmp_path):
    raises(load_rankings, _corrupt_copy(tmp_path, RANKINGS, 100, lambda l: l[:-5]),
           "rankings_oasst_en.jsonl:100: invalid JSON")
    raises(load_rankings, _corrupt_copy(tmp_path, RANKINGS, 57, _set("ranking", [0])),
           "rankings_oasst_en.jsonl:57: field 'ranking' has 1 entries")
    raises(load_rankings, _corrupt_copy(tmp_path, RANKINGS, 3, _set("completions", ["only one"])),
           "rankings_oasst_en.jsonl:3: field 'completions' needs at least 2 completions, got 1")
    raises(load_rankings, _corrupt_copy(tmp_path, RANKINGS, 329, _set("history", [{"role": "user"}])),
           "rankings_oasst_en.jsonl:329: missing field 'history[0].content'")
    raises(load_sft, _corrupt_copy(tmp_path, SFT, 175, _set("response", 42)),
           "sft_selfinstruct_seed.jsonl:175: field 'response' must be a string, got int")
    raises(load_prompts, _corrupt_copy(tmp_path, PROMPTS, 12, lambda l: l.replace('"prompt"', '"promt"', 1)),
           "prompts_selfinstruct_user_oriented.jsonl:12: missing field 'prompt'")
    gz = tmp_path / PAIRS.name
    with gzip.open(PAIRS, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    lines[1000] = json.dumps({**json.loads(lines[1000]), "rejected": None})
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    raises(load_rankings, gz, "pairs_hh_harmless_test.jsonl.gz:1001: field 'rejected' must be a string, got null")
    trunc = tmp_path / "trunc.jsonl.gz"
    shutil.copyfile(PAIRS, trunc)
    with open(trunc, "r+b") as f:
        f.truncate(len(PAIRS.read_bytes()) // 2)
    raises(lambda p: load_rankings(p), trunc, "corrupt gzip")


# ---------------------------------------------------------------------------- SFT encoding, packing
def test_encode_sft_masks_truncation_and_drops():
    tok = CharTok()
    ex = [{"prompt": "ab", "response": "cd"},          # fits
          {"prompt": "abcdefgh", "response": "xy"},    # prompt cut from the left
          {"prompt": "p", "response": "0123456789"},   # response + eos alone = max_len: dropped
          {"prompt": "", "response": "r"}]             # empty prompt: kept, nothing to cut
    out = encode_sft(ex, tok, max_len=6)
    e = tok.encode
    assert out[0] == (e("ab") + e("cd") + [2], [0, 0, 1, 1, 1])
    assert out[1] == (e("fgh") + e("xy") + [2], [0, 0, 0, 1, 1, 1])
    assert out[2] == (e("r") + [2], [1, 1])
    assert (len(out), out.dropped, out.truncated) == (3, 1, 1)
    # "response alone does not fit": response + eos must leave one prompt token of context.
    assert encode_sft([{"prompt": "p", "response": "01234"}], tok, 6).dropped == 1
    assert encode_sft([{"prompt": "pq", "response": "0123"}], tok, 6)[0][1] == [0, 1, 1, 1, 1, 1]


def test_pack_first_fit_no_split_padding_masked():
    seqs = [([5] * n, [0] + [1] * (n - 1)) for n in (3, 7, 4, 2, 6, 1)]
    seqs = [([10 * i + 5] * len(ids), m) for i, (ids, m) in enumerate(seqs)]
    ids, mask = pack(seqs, seq_len=8, pad_id=0)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == (3, 8)
    # Every example appears exactly once, contiguous, in one row, with its own mask.
    for i, (s, m) in enumerate(seqs):
        hits = [(r, c) for r in range(ids.shape[0]) for c in range(8) if ids[r, c] == s[0]]
        assert len(hits) == len(s) and len({r for r, _ in hits}) == 1
        r, c0 = hits[0]
        assert mask[r, c0:c0 + len(s)].tolist() == [bool(x) for x in m]
    assert not mask[ids == 0].any() and (ids == 0).sum() == 3 * 8 - 23
    with pytest.raises(ValueError, match="example 1 has 9 tokens > seq_len=8"):
        pack([([1], [1]), ([1] * 9, [1] * 9)], 8, 0)
    with pytest.raises(ValueError, match="example 0 has 2 ids but 1 mask"):
        pack([([1, 2], [1])], 8, 0)


# ---------------------------------------------------------------------------- ranking batches
def test_encode_and_collate_rankings():
    tok = CharTok()
    ex = [{"prompt": "Q", "completions": ["aa", "b", "ccc"], "ranking": [1, 0, 2]},
          {"prompt": "PROMPT", "completions": ["x", "yyyyyyyyyy"], "ranking": [0, 1]}]
    enc = encode_rankings(ex, tok, max_len=8)
    e = tok.encode
    assert enc[0]["ids"] == [e("Qaa") + [2], e("Qb") + [2], e("Qccc") + [2]]
    assert enc[0]["last_idx"] == [3, 2, 4]
    # Group 2 is too long: the prompt keeps max_len // 2 = 4 tokens from its end (shared by both
    # completions), the long completion is cut on the right and still ends with EOS.
    assert enc[1]["ids"] == [e("OMPTx") + [2], e("OMPTyyy") + [2]]
    assert all(len(s) <= 8 for g in enc for s in g["ids"]) and enc.truncated == 1
    b = collate_rankings(enc, pad_id=0)
    assert b.ids.shape == (5, 8) and b.ids.dtype == torch.long
    assert b.ids[1].tolist() == e("Qb") + [2] + [0] * 5
    assert (b.ids[torch.arange(5), b.last_idx] == 2).all()
    assert b.ranking.tolist() == [[1, 0, 2], [0, 1, -1]] and b.group_sizes.tolist() == [3, 2]
    # Per-sequence scores regroup into ranking's [B, Kmax] layout with gradients intact.
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    grouped = unflatten_groups(scores, b.group_sizes)
    assert grouped.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]
    grouped.sum().backward()
    assert scores.grad.tolist() == [1.0] * 5


def test_collate_rankings_packed_places_every_sequence_once():
    tok = CharTok()
    ex = [{"prompt": "Q", "completions": ["aa", "b", "ccc"], "ranking": [1, 0, 2]},
          {"prompt": "PROMPT", "completions": ["x", "yyyyyyyyyy"], "ranking": [0, 1]}]
    enc = encode_rankings(ex, tok, max_len=8)
    flat = [s for g in enc for s in g["ids"]]
    b = collate_rankings(enc, pad_id=0, pack_len=10)
    # 5 sequences of 5, 4, 6, 6, 8 tokens: first-fit decreasing needs 3 rows of <= 10
    assert b.ids.shape == (3, 10) and b.segment_ids.shape == b.ids.shape
    assert b.ranking.tolist() == [[1, 0, 2], [0, 1, -1]] and b.group_sizes.tolist() == [3, 2]
    seen = set()
    for i, s in enumerate(flat):
        r, end = int(b.row[i]), int(b.last_idx[i])
        got = b.ids[r, end - len(s) + 1:end + 1].tolist()
        assert got == s and b.ids[r, end] == 2  # the whole sequence, read at its EOS
        sid = b.segment_ids[r, end - len(s) + 1:end + 1]
        assert (sid == sid[0]).all() and sid[0] > 0 and (r, int(sid[0])) not in seen
        seen.add((r, int(sid[0])))
    assert int((b.segment_ids > 0).sum()) == sum(len(s) for s in flat)  # nothing else is real
    with pytest.raises(ValueError, match="pack_len=7"):
        collate_rankings(enc, pad_id=0, pack_len=7)


def test_reward_model_packed_scores_equal_padded_scores():
    from engine.config import GPTConfig
    from engine.model import RewardModel
    from recipes.rm import group_rewards
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(n_layer=2, d_model=32, n_head=2, d_head=16, block_size=32,
                               vocab_size=64, window=4, dropout=0.0)).eval()
    g = torch.Generator().manual_seed(1)
    groups = []
    for k in range(5):  # groups of 2-4 completions, lengths 3..14, one shared prompt each
        p = torch.randint(3, 64, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        ids = [p + torch.randint(3, 64, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist() + [2]
               for _ in range(2 + k % 3)]
        groups.append({"ids": ids, "last_idx": [len(s) - 1 for s in ids], "ranking": list(range(len(ids)))})
    with torch.no_grad():
        padded = group_rewards(rm, collate_rankings(groups, 0))
        packed_b = collate_rankings(groups, 0, pack_len=32)
        packed = group_rewards(rm, packed_b)
    assert packed_b.ids.numel() < collate_rankings(groups, 0).ids.numel()
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed == 0, padded == 0)  # group padding slots hold 0 in both layouts


def test_rankings_real_data_batch_feeds_ranking_loss():
    from engine.losses import ranking_loss
    from engine.tokenizer import Tokenizer
    tok = Tokenizer.train(DATA / "text_tinyshakespeare.txt", None, vocab_size=400)
    enc = encode_rankings(load_rankings(RANKINGS)[:16], tok, max_len=128)
    b = collate_rankings(enc, tok.pad_id)
    assert b.ids.shape[0] == int(b.group_sizes.sum()) and b.ids.shape[1] <= 128
    assert (b.ids[torch.arange(len(b.last_idx)), b.last_idx] == tok.eos_id).all()
    rewards = unflatten_groups(torch.randn(len(b.last_idx)), b.group_sizes)
    assert torch.isfinite(ranking_loss(rewards, b.ranking))


# ---------------------------------------------------------------------------- token streams
@pytest.fixture(scope="module")
def real_tok():
    from engine.tokenizer import Tokenizer
    return Tokenizer.train(DATA / "text_tinyshakespeare.txt", None, vocab_size=512)


def test_token_stream_memmap_matches_encode_and_is_cached(tmp_path, real_tok):
    text = load_text(DATA / "text_tinyshakespeare.txt")[:120_000]
    path = tmp_path / "shards" / "train.bin"
    ts = TokenStream.from_text(text, real_tok, path, chunk_chars=10_000)  # many chunks
    assert isinstance(ts.tokens, np.memmap) and ts.tokens.dtype == np.uint16
    assert ts.tokens.tolist() == real_tok.encode(text)
    meta = json.loads((tmp_path / "shards" / "train.bin.json").read_text())
    assert meta["num_tokens"] == len(ts) and meta["dtype"] == "uint16"
    stamp = os.stat(path).st_mtime_ns
    assert TokenStream.from_text(text, real_tok, path).tokens.tolist() == ts.tokens.tolist()
    assert os.stat(path).st_mtime_ns == stamp  # same text + tokenizer: reused, not rewritten
    ts2 = TokenStream.from_text(text[:1000], real_tok, path)
    assert len(ts2) < len(ts)  # different text: rewritten
    docs = TokenStream.from_text(["ab", "cd"], real_tok)
    assert docs.tokens.tolist() == real_tok.encode("ab") + [2] + real_tok.encode("cd")


def test_token_stream_random_batches():
    ts = TokenStream(np.arange(1000, dtype=np.uint16))
    x, y = ts.batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # y is x shifted by one token (stream is 0, 1, 2, ...)
    x2, _ = ts.batch(4, 16, torch.Generator().manual_seed(0))
    x3, _ = ts.batch(4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    assert int(x.max()) <= 998
    with pytest.raises(ValueError, match="has 1000 tokens, a batch needs 1001"):
        ts.batch(1, 1000)


def test_token_stream_sequential_resume_wrap_and_ranks():
    ts = TokenStream(np.arange(100, dtype=np.uint32))
    x, y = ts.next_batch(2, 10)
    assert x[:, 0].tolist() == [0, 10] and torch.equal(y, x + 1)
    state = ts.state_dict()
    want = [ts.next_batch(2, 10)[0] for _ in range(6)]
    ts2 = TokenStream(np.arange(100, dtype=np.uint32))
    ts2.load_state_dict(state)
    got = [b[0] for b, _ in zip(ts2.iter_sequential(2, 10), range(6))]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # 4 full steps of 20 fit in 100 tokens (the 5th would need token 100): then it wraps.
    assert [w[0, 0].item() for w in want] == [20, 40, 60, 0, 20, 40] and ts.epoch == 1
    r0 = TokenStream(np.arange(100, dtype=np.uint16)).next_batch(2, 10, rank=0, world_size=2)[0]
    r1 = TokenStream(np.arange(100, dtype=np.uint16)).next_batch(2, 10, rank=1, world_size=2)[0]
    assert r0[:, 0].tolist() == [0, 10] and r1[:, 0].tolist() == [20, 30]
    with pytest.raises(ValueError, match="for 50 tokens"):
        ts.load_state_dict({"cursor": 0, "epoch": 0, "num_tokens": 50})


def test_token_stream_large_vocab_and_bad_files(tmp_path):
    class Big(CharTok):
        vocab_size = 70_000
    ts = TokenStream.from_text("hello", Big(), tmp_path / "big.bin")
    assert ts.tokens.dtype == np.uint32 and ts.tokens.tolist() == Big().encode("hello")
    (tmp_path / "big.bin").write_bytes(b"\0" * 6)
    with pytest.raises(DataError, match="big.bin: size 6 bytes does not match num_tokens=5"):
        TokenStream.open(tmp_path / "big.bin")
    (tmp_path / "orphan.bin").write_bytes(b"\0" * 4)
    with pytest.raises(DataError, match="orphan.bin.json: missing or invalid"):
        TokenStream.open(tmp_path / "orphan.bin")
