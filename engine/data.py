"""Data: validated readers for every format of DESIGN.md section 4, and tokenized datasets.

Readers fail fast with ``DataError("<file>:<line>: field '<name>' ...")`` -- never a stack
trace from inside json / torch. Tokenized datasets are plain lists / tensors and deterministic.

Loss-mask convention (SFT and packing): ``mask[t] == 1`` means ``ids[t]`` is a response token
(or the closing EOS), i.e. the loss is on predicting ``ids[t]`` from ``ids[:t]``. With the usual
shift, the model's logits at position t-1 are scored against ``ids[t]`` where ``mask[t]``; so a
loss function uses ``logits[:, :-1]``, ``ids[:, 1:]`` and ``mask[:, 1:]``.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

K_MIN = 2  # a ranking group needs at least two completions to compare


class DataError(ValueError):
    """Invalid input data; the message names the file, the line and the field."""


# ------------------------------------------------------------------------------- JSONL reading
_JSON_TYPE = {str: "string", int: "int", float: "float", bool: "bool", type(None): "null",
              list: "list", dict: "object"}


def _tname(v) -> str:
    return _JSON_TYPE.get(type(v), type(v).__name__)


def _open_bytes(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """Yield ``(lineno, obj)`` for each non-blank line of a ``.jsonl`` or ``.jsonl.gz`` file."""
    path = os.fspath(path)
    seen = False
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line") from None
                if not line.strip():
                    continue
                seen = True
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {_tname(obj)}")
                yield lineno, obj
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{path}: corrupt gzip file ({e})") from None
    if not seen:
        raise DataError(f"{path}: file is empty")


def _get(obj: dict, key: str, typ, where: str, name: str | None = None):
    """Fetch a required field and check its type; ``name`` is the field as printed in errors."""
    name = name or key
    if key not in obj:
        raise DataError(f"{where}: missing field '{name}'")
    v = obj[key]
    ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
    if not ok:
        want = {str: "a string", list: "a list", dict: "an object", int: "an int"}[typ]
        raise DataError(f"{where}: field '{name}' must be {want}, got {_tname(v)}")
    return v


# ------------------------------------------------------------------------------- chat template
# One fixed, plain template ("User: ...\nAssistant: ..."); aliases cover oasst ("prompter") and
# hh-rlhf ("human") role names.
_ROLES = {"user": "User", "prompter": "User", "human": "User", "assistant": "Assistant",
          "system": "System"}
GENERATION_PROMPT = "Assistant: "


def render_messages(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render ``[{"role", "content"}...]`` as "User: ...\\nAssistant: ..." lines.

    With ``add_generation_prompt`` the text ends with "Assistant: " so a model continues with the
    assistant's reply (used for SFT prompts and for ranking prompts that carry a history).
    """
    turns = [f"{_ROLES[m['role']]}: {m['content']}" for m in messages]
    if add_generation_prompt:
        turns.append(GENERATION_PROMPT)
    return "\n".join(turns)


def _messages(obj: dict, key: str, where: str) -> list[dict]:
    """Validate a list of turns; accepts "content" or (oasst) "text"; returns role/content dicts."""
    out = []
    for i, m in enumerate(_get(obj, key, list, where)):
        fname = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{fname}' must be an object, got {_tname(m)}")
        role = _get(m, "role", str, where, f"{fname}.role")
        if role not in _ROLES:
            raise DataError(f"{where}: field '{fname}.role' is '{role}', expected one of {sorted(_ROLES)}")
        ckey = "content" if "content" in m or "text" not in m else "text"
        out.append({"role": role, "content": _get(m, ckey, str, where, f"{fname}.{ckey}")})
    return out


# ------------------------------------------------------------------------------- record readers
def load_sft(path) -> list[dict]:
    """``{"prompt", "response"}`` or ``{"messages": [...]}`` lines -> ``[{"prompt", "response"}]``.

    For messages, the last turn must be the assistant's: it is the response; the turns before it
    are rendered with ``render_messages(..., add_generation_prompt=True)`` as the prompt.
    """
    out = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" in obj:
            msgs = _messages(obj, "messages", where)
            if not msgs or _ROLES[msgs[-1]["role"]] != "Assistant":
                raise DataError(f"{where}: field 'messages' must end with an assistant turn")
            prompt = render_messages(msgs[:-1], add_generation_prompt=True)
            out.append({"prompt": prompt, "response": msgs[-1]["content"]})
        else:
            out.append({"prompt": _get(obj, "prompt", str, where),
                        "response": _get(obj, "response", str, where)})
    return out


def _ranking_record(obj: dict, where: str) -> dict:
    prompt = _get(obj, "prompt", str, where)
    if "completions" not in obj and "ranking" not in obj and ("chosen" in obj or "rejected" in obj):
        # Pair format: K = 2, chosen is rank 0.
        return {"prompt": prompt, "completions": [_get(obj, "chosen", str, where),
                                                  _get(obj, "rejected", str, where)],
                "ranking": [0, 1]}
    if "completions" not in obj and "ranking" not in obj:
        raise DataError(f"{where}: missing field 'completions' (ranked format) "
                        "or 'chosen'/'rejected' (pair format)")
    comps = _get(obj, "completions", list, where)
    ranking = _get(obj, "ranking", list, where)
    for i, c in enumerate(comps):
        if not isinstance(c, str):
            raise DataError(f"{where}: field 'completions[{i}]' must be a string, got {_tname(c)}")
    k = len(comps)
    if k < K_MIN:
        raise DataError(f"{where}: field 'completions' needs at least {K_MIN} completions, got {k}")
    if len(ranking) != k:
        raise DataError(f"{where}: field 'ranking' has {len(ranking)} entries "
                        f"but 'completions' has {k}")
    for i, r in enumerate(ranking):
        if not isinstance(r, int) or isinstance(r, bool):
            raise DataError(f"{where}: field 'ranking[{i}]' must be an int, got {_tname(r)}")
        if not 0 <= r < k:
            raise DataError(f"{where}: field 'ranking[{i}]' is {r}, must be in [0, {k - 1}]")
    if "history" in obj and obj["history"] is not None:
        history = _messages(obj, "history", where)
        if history:
            prompt = render_messages(history + [{"role": "user", "content": prompt}], True)
    return {"prompt": prompt, "completions": list(comps), "ranking": list(ranking)}


def load_rankings(path) -> list[dict]:
    """Ranked or pair JSONL (detected per line) -> ``[{"prompt", "completions", "ranking"}]``.

    ``ranking[i]`` is the rank of ``completions[i]`` (0 best, ties allowed). A non-empty
    ``history`` (turns with "content" or "text") is rendered before the prompt with the chat
    template, ending in the generation prompt; without history the prompt is used verbatim.
    """
    return [_ranking_record(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]


def load_prompts(path) -> list[str]:
    """``{"prompt": str}`` lines -> list of prompts."""
    return [_get(obj, "prompt", str, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))


def load_documents(path) -> list[str]:
    """Documents of a ``.txt`` (the whole file is one document) or JSONL ``{"text": str}`` file."""
    path = os.fspath(path)
    if _is_jsonl(path):
        return [_get(obj, "text", str, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]
    with _open_bytes(path) as f:
        raw = f.read()
    if not raw:
        raise DataError(f"{path}: file is empty")
    try:
        return [raw.decode("utf-8")]
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte offset {e.start} ({e.reason})") from None


def load_text(path) -> str:
    """Plain text of a ``.txt`` file, or the ``text`` fields of a JSONL file joined by a blank line."""
    return "\n\n".join(load_documents(path))


# ------------------------------------------------------------------------------- SFT tensors
class Encoded(list):
    """A list of encoded examples that also counts what encoding dropped / truncated."""

    def __init__(self, items=(), dropped: int = 0, truncated: int = 0):
        super().__init__(items)
        self.dropped = dropped
        self.truncated = truncated


def encode_sft(examples: list[dict], tok, max_len: int) -> Encoded:
    """-> ``Encoded`` list of ``(ids, loss_mask)``: ids = prompt + response + [eos].

    ``loss_mask[t] = 1`` exactly on response tokens and the EOS (see the module docstring).
    A too-long prompt loses tokens from the left (the end of the prompt, next to the response,
    matters most); an example is dropped (counted in ``.dropped``) when the response + EOS plus
    one prompt token does not fit -- the first response token needs some context to be learned.
    """
    if max_len < 2:
        raise ValueError(f"encode_sft: max_len must be >= 2, got {max_len}")
    prompts = tok.encode_batch([e["prompt"] for e in examples])
    responses = tok.encode_batch([e["response"] for e in examples])
    out = Encoded()
    for p, r in zip(prompts, responses):
        r = r + [tok.eos_id]
        room = max_len - len(r)
        if room < min(1, len(p)):
            out.dropped += 1
            continue
        if len(p) > room:
            p = p[len(p) - room:]
            out.truncated += 1
        out.append((p + r, [0] * len(p) + [1] * len(r)))
    return out


def pack(seqs, seq_len: int, pad_id: int, *, return_segments: bool = False):
    """Pack ``(ids, loss_mask)`` examples into rows of ``seq_len`` -> (ids [N, seq_len] long,
    loss_mask [N, seq_len] bool), plus segment ids [N, seq_len] long with ``return_segments``.

    First-fit decreasing: longest first, each into the first row with room (deterministic; row
    order is by first use). No example is split across rows; padding has mask 0. Segment ids
    number the examples of a row 1, 2, ... (padding 0); passed to the model as ``segment_ids``
    (``data.mask_packed``, the default in the recipes) each example sees only itself, with
    positions from 0, exactly as if it were alone. Without them packed examples attend to their
    earlier neighbours and positions run on along the row (as in GPT-3 pretraining).
    """
    lengths = [len(ids) for ids, _ in seqs]
    for i, ((ids, mask), n) in enumerate(zip(seqs, lengths)):
        if len(mask) != n:
            raise ValueError(f"pack: example {i} has {n} ids but {len(mask)} mask entries")
        if n > seq_len:
            raise ValueError(f"pack: example {i} has {n} tokens > seq_len={seq_len}; "
                             "encode with max_len <= seq_len")
    rows = _first_fit(lengths, seq_len)
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    seg = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, (r, pos, s_id) in enumerate(_layout(rows, lengths)):
        n = lengths[i]
        ids[r, pos:pos + n] = torch.as_tensor(seqs[i][0], dtype=torch.long)
        mask[r, pos:pos + n] = torch.as_tensor(seqs[i][1], dtype=torch.bool)
        seg[r, pos:pos + n] = s_id
    return (ids, mask, seg) if return_segments else (ids, mask)


def _first_fit(lengths: list[int], seq_len: int) -> list[list[int]]:
    """First-fit decreasing: the members of each row, longest first, each example into the
    first row with room (deterministic: ties keep input order, rows in order of first use)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, room in enumerate(free) if lengths[i] <= room), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(seq_len)
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def _layout(rows: list[list[int]], lengths: list[int]) -> list[tuple[int, int, int]]:
    """(row, first column, segment id 1, 2, ...) of each example, in example order, for the
    rows of `_first_fit`: a row's members sit back to back in their order there."""
    place = [(0, 0, 0)] * len(lengths)
    for r, members in enumerate(rows):
        pos = 0
        for s_id, i in enumerate(members, start=1):
            place[i] = (r, pos, s_id)
            pos += lengths[i]
    return place


def segments_from_eos(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Segment ids [B, T] for windows of an EOS-separated token stream: a new segment starts
    after every EOS (the EOS itself closes the document before it)."""
    eos = (ids == eos_id).long()
    return eos.cumsum(1) - eos


# ------------------------------------------------------------------------------- RM tensors
def encode_rankings(examples: list[dict], tok, max_len: int) -> Encoded:
    """-> ``Encoded`` list of ``{"ids": [[int]...], "last_idx": [int...], "ranking": [int...],
    "prompt_len": int}``.

    Each sequence is prompt + completion + [eos] (the first ``prompt_len`` tokens are the
    prompt's); the reward model reads its score at ``last_idx`` (the EOS). All completions of a group share one prompt truncation so they are
    compared on equal context. When a group does not fit, the prompt is cut from the left first,
    but keeps at least ``min(len(prompt), max_len // 2)`` tokens; completions longer than what is
    left are cut on the right and still end with EOS (counted in ``.truncated``).
    """
    if max_len < 4:
        raise ValueError(f"encode_rankings: max_len must be >= 4, got {max_len}")
    out = Encoded()
    prompts = tok.encode_batch([e["prompt"] for e in examples])
    for ex, p in zip(examples, prompts):
        comps = [c + [tok.eos_id] for c in tok.encode_batch(ex["completions"])]
        longest = max(len(c) for c in comps)
        if len(p) + longest > max_len:
            out.truncated += 1
            cap = max_len - min(len(p), max_len // 2)
            comps = [c if len(c) <= cap else c[:cap - 1] + [tok.eos_id] for c in comps]
            keep = max_len - max(len(c) for c in comps)
            p = p[len(p) - keep:]
        ids = [p + c for c in comps]
        out.append({"ids": ids, "last_idx": [len(s) - 1 for s in ids], "ranking": list(ex["ranking"]),
                    "prompt_len": len(p)})
    return out


class RankingBatch(NamedTuple):
    ids: torch.Tensor          # [sum K, T] long, right-padded with pad_id (packed: [rows, T])
    last_idx: torch.Tensor     # [sum K] long: where each sequence's score is read (column)
    ranking: torch.Tensor      # [B, Kmax] long, -1 = padding
    group_sizes: torch.Tensor  # [B] long: K of each group (rows of ids, in order)
    segment_ids: Optional[torch.Tensor] = None  # packed: [rows, T] long, 1, 2, ... per row, 0 = pad
    row: Optional[torch.Tensor] = None          # packed: [sum K] long, the row holding each sequence
    ref_loglik: Optional[torch.Tensor] = None   # [sum K] fp32: log pi_ref(completion | prompt) of each
                                                # sequence, when the groups carry "ref_loglik"
    branch_ids: Optional[torch.Tensor] = None   # shared prompts: [rows, T] long, 0 = a group's prompt,
                                                # k = its k-th completion (GPT.hidden_states)

    def to(self, device) -> "RankingBatch":
        return RankingBatch(*(None if t is None else t.to(device) for t in self))


def collate_rankings(batch: list[dict], pad_id: int, pack_len: int | None = None,
                     share_prompt: bool = False) -> RankingBatch:
    """Stack ``encode_rankings`` items: all completions of all groups become rows of ``ids``.

    pack_len: instead pack the sequences (first-fit decreasing, as ``pack``) into rows of at most
    pack_len tokens with ``segment_ids``, so each sequence attends only to itself with positions
    from 0 (the scores equal the unpacked ones up to float rounding) and no compute goes to
    padding: completions differ in length by up to ~2x, so right-padding to the longest wastes
    ~40% of a batch. Sequence i is read at ``ids[row[i], last_idx[i]]``.

    share_prompt (with pack_len; items need "prompt_len"): a group's prompt is packed once and
    its completions follow it as branches (``branch_ids``): each completion attends to the prompt
    and itself at the positions it would have alone, so the scores are again the unpacked ones up
    to float rounding, while the prompt's tokens are computed once instead of K times (in the
    miniature RM data the prompt is ~80% of each sequence). A group too long for one row is
    split into several segments, each with its own copy of the prompt.
    """
    if not batch:
        raise ValueError("collate_rankings: empty batch")
    seqs = [s for item in batch for s in item["ids"]]
    sizes = torch.tensor([len(item["ids"]) for item in batch], dtype=torch.long)
    ranking = torch.full((len(batch), int(sizes.max())), -1, dtype=torch.long)
    for b, item in enumerate(batch):
        ranking[b, :len(item["ranking"])] = torch.as_tensor(item["ranking"], dtype=torch.long)
    last = [i for item in batch for i in item["last_idx"]]
    ref = (torch.tensor([x for item in batch for x in item["ref_loglik"]], dtype=torch.float32)
           if all("ref_loglik" in item for item in batch) else None)
    if share_prompt:
        if pack_len is None:
            raise ValueError("collate_rankings: share_prompt needs pack_len")
        return _collate_shared(batch, pad_id, pack_len, ranking, sizes, ref)
    if pack_len is not None:
        too_long = next((i for i, x in enumerate(seqs) if len(x) > pack_len), None)
        if too_long is not None:
            raise ValueError(f"collate_rankings: sequence {too_long} has {len(seqs[too_long])} tokens "
                             f"> pack_len={pack_len}")
        lengths = [len(s) for s in seqs]
        members = _first_fit(lengths, pack_len)
        place = _layout(members, lengths)
        T = max(pos + n for (_, pos, _), n in zip(place, lengths))  # no column that only pads
        ids = torch.full((len(members), T), pad_id, dtype=torch.long)
        seg = torch.zeros((len(members), T), dtype=torch.long)
        for s, (r, pos, s_id) in zip(seqs, place):
            ids[r, pos:pos + len(s)] = torch.as_tensor(s, dtype=torch.long)
            seg[r, pos:pos + len(s)] = s_id
        row, start = (torch.tensor(c, dtype=torch.long) for c in list(zip(*place))[:2])
        return RankingBatch(ids, torch.tensor(last, dtype=torch.long) + start, ranking, sizes, seg, row, ref)
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return RankingBatch(ids, torch.tensor(last, dtype=torch.long), ranking, sizes, ref_loglik=ref)


def _collate_shared(batch, pad_id, pack_len, ranking, sizes, ref) -> RankingBatch:
    units, lengths = [], []  # a unit: (prompt, [(sequence index, response tokens)]), one segment
    i = 0
    for g, item in enumerate(batch):
        if "prompt_len" not in item:
            raise ValueError(f"collate_rankings: group {g} has no prompt_len (share_prompt needs encode_rankings items)")
        P = item["prompt_len"]
        prompt = item["ids"][0][:P]
        unit, n = [], P
        for s in item["ids"]:
            if s[:P] != prompt or len(s) <= P:
                raise ValueError(f"collate_rankings: group {g}: a sequence does not start with the group's "
                                 f"{P}-token prompt followed by a completion")
            if len(s) > pack_len:
                raise ValueError(f"collate_rankings: group {g}: sequence of {len(s)} tokens > pack_len={pack_len}")
            if unit and n + len(s) - P > pack_len:  # this segment is full: the next repeats the prompt
                units.append((prompt, unit))
                lengths.append(n)
                unit, n = [], P
            unit.append((i, s[P:]))
            n += len(s) - P
            i += 1
        units.append((prompt, unit))
        lengths.append(n)
    members = _first_fit(lengths, pack_len)
    place = _layout(members, lengths)
    T = max(pos + n for (_, pos, _), n in zip(place, lengths))
    ids = torch.full((len(members), T), pad_id, dtype=torch.long)
    seg = torch.zeros((len(members), T), dtype=torch.long)
    branch = torch.zeros((len(members), T), dtype=torch.long)
    row, last = [0] * i, [0] * i
    for (prompt, unit), (r, pos, s_id), n in zip(units, place, lengths):
        seg[r, pos:pos + n] = s_id
        ids[r, pos:pos + len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
        c = pos + len(prompt)
        for k, (j, resp) in enumerate(unit, start=1):
            ids[r, c:c + len(resp)] = torch.as_tensor(resp, dtype=torch.long)
            branch[r, c:c + len(resp)] = k
            c += len(resp)
            row[j], last[j] = r, c - 1
    return RankingBatch(ids, torch.tensor(last, dtype=torch.long), ranking, sizes, seg,
                        torch.tensor(row, dtype=torch.long), ref, branch)


def unflatten_groups(values: torch.Tensor, group_sizes: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """[sum K] per-sequence values -> [B, Kmax] (padding = ``fill``), matching ``ranking``'s layout."""
    B, kmax = len(group_sizes), int(group_sizes.max())
    group = torch.repeat_interleave(torch.arange(B, device=values.device), group_sizes.to(values.device))
    starts = torch.cumsum(group_sizes, 0) - group_sizes
    col = torch.arange(len(values), device=values.device) - starts.to(values.device)[group]
    out = values.new_full((B, kmax), fill)
    return out.index_put((group, col), values)  # out-of-place: keeps autograd to ``values``


# ------------------------------------------------------------------------------- pretraining
class TokenStream:
    """A flat token array (numpy memmap on disk, or in memory) for pretraining / ptx batches.

    ``batch`` draws random windows from a torch generator (resume = restore the generator);
    ``next_batch`` walks the stream in order with a cursor saved by ``state_dict``.
    """

    def __init__(self, tokens: np.ndarray, path: str | None = None):
        self.tokens = tokens
        self.path = path
        self.cursor = 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def _dtype(vocab_size: int):
        return np.uint16 if vocab_size < 65536 else np.uint32

    @classmethod
    def from_text(cls, text, tok, path=None, chunk_chars: int = 1 << 20) -> "TokenStream":
        """Tokenize ``text`` (a str, or a list of documents joined by EOS).

        With ``path`` (``X.bin``; a ``X.bin.json`` meta file sits beside it), tokens are written
        to disk in chunks and memory-mapped; an existing file is reused when its meta matches this
        text and tokenizer.
        """
        docs = [text] if isinstance(text, str) else list(text)
        dtype = cls._dtype(tok.vocab_size)
        h = hashlib.sha256()
        for d in docs:
            h.update(hashlib.sha256(d.encode("utf-8", "surrogatepass")).digest())
        meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
                "tokenizer_sha256": hashlib.sha256(tok.model_proto).hexdigest(),
                "text_sha256": h.hexdigest()}
        if path is None:
            ids = [t for chunk in cls._encode_chunks(docs, tok, chunk_chars) for t in chunk]
            return cls(np.asarray(ids, dtype=dtype))
        path = os.fspath(path)
        meta_path = path + ".json"
        if os.path.exists(path) and os.path.exists(meta_path):
            old = json.loads(Path(meta_path).read_text())
            if {k: old.get(k) for k in meta} == meta:
                return cls.open(path)
        # Per-process temp names + atomic renames: a crash never leaves a half-written stream
        # behind a valid meta. (Under torchrun, build on one rank first, then barrier.)
        n, tmp = 0, f"{path}.tmp{os.getpid()}"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            for chunk in cls._encode_chunks(docs, tok, chunk_chars):
                np.asarray(chunk, dtype=dtype).tofile(f)
                n += len(chunk)
        Path(tmp + ".json").write_text(json.dumps({**meta, "num_tokens": n}, indent=1))
        os.replace(tmp, path)
        os.replace(tmp + ".json", meta_path)
        return cls.open(path)

    @staticmethod
    def _encode_chunks(docs, tok, chunk_chars):
        # Cut each document after a newline ("\n" is its own piece, so no token spans a cut and
        # the result equals encoding the whole text); EOS separates documents.
        for di, doc in enumerate(docs):
            pieces, start = [], 0
            while start < len(doc):
                end = doc.find("\n", start + chunk_chars)
                end = len(doc) if end < 0 else end + 1
                pieces.append(doc[start:end])
                start = end
            for k in range(0, len(pieces), 16):
                yield [t for ids in tok.encode_batch(pieces[k:k + 16]) for t in ids]
            if di < len(docs) - 1:
                yield [tok.eos_id]

    @classmethod
    def open(cls, path) -> "TokenStream":
        """Memory-map a ``.bin`` written by ``from_text`` (dtype and length from its meta file)."""
        path = os.fspath(path)
        try:
            meta = json.loads(Path(path + ".json").read_text())
            dtype, n = np.dtype(meta["dtype"]), int(meta["num_tokens"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path}.json: missing or invalid token-stream meta ({e})") from None
        if os.path.getsize(path) != n * dtype.itemsize:
            raise DataError(f"{path}: size {os.path.getsize(path)} bytes does not match "
                            f"num_tokens={n} x {dtype.itemsize} from its meta file")
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        return cls(tokens, path)

    def _check(self, need: int):
        if len(self.tokens) < need:
            raise ValueError(f"TokenStream has {len(self.tokens)} tokens, a batch needs {need}")

    def _windows(self, starts, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(self.tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator | None = None):
        """Random windows -> (x, y) long [batch_size, seq_len], y = x shifted by one token."""
        self._check(seq_len + 1)
        starts = torch.randint(0, len(self.tokens) - seq_len, (batch_size,), generator=generator)
        return self._windows(starts.tolist(), seq_len)

    def next_batch(self, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        """Next consecutive windows at the cursor; the stream's tail that does not fill a whole
        step is skipped and the cursor wraps (``epoch += 1``). Under data parallelism every rank
        calls this with the same arguments and gets a disjoint slice of the same step."""
        step = batch_size * seq_len * world_size
        self._check(step + 1)
        if self.cursor + step + 1 > len(self.tokens):
            self.cursor, self.epoch = 0, self.epoch + 1
        base = self.cursor + rank * batch_size * seq_len
        self.cursor += step
        return self._windows([base + i * seq_len for i in range(batch_size)], seq_len)

    def iter_sequential(self, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        """Endless ``next_batch`` generator (state_dict() at any point resumes right after)."""
        while True:
            yield self.next_batch(batch_size, seq_len, rank, world_size)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_tokens", len(self.tokens)) != len(self.tokens):
            raise ValueError(f"TokenStream state is for {state['num_tokens']} tokens, "
                             f"this stream has {len(self.tokens)}")
        self.cursor, self.epoch = int(state["cursor"]), int(state["epoch"])
