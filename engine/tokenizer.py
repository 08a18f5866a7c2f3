"""SentencePiece tokenizer: train / load / save / encode / decode.

The model is configured so that ``decode(encode(s)) == s`` for every Python string:

* normalization is the identity (no NFKC, no whitespace collapsing, no dummy prefix), so
  spaces, tabs and newlines survive;
* ``byte_fallback`` turns every character the vocabulary lacks into its UTF-8 bytes
  (``<0xNN>`` pieces) instead of ``<unk>``, so emoji / CJK / control characters never seen in
  training still round-trip;
* the one character SentencePiece cannot represent natively is U+2581 (``▁``), which it uses
  internally for the space; ``encode`` emits it as its three byte pieces (see ``_encode_one``).

Special ids are fixed: pad=0, bos=1, eos=2, unk=3 (then 256 byte pieces, then ``\\n`` as a
user-defined symbol -- SentencePiece's trainer never learns a piece for newlines on its own,
they would otherwise cost a byte-fallback token anyway -- then the learned pieces).

Training is deterministic: the model file depends only on the text and the arguments (no
sampling, no shuffling, ``model_writer`` keeps the output path out of the stored trainer spec).
"""
from __future__ import annotations

import gzip
import io
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_FILENAME = "tokenizer.model"

_SPACE_MARK = "\u2581"  # SentencePiece's internal stand-in for " "
# Lines longer than this are cut into chunks before training: SentencePiece silently skips
# training sentences above max_sentence_length, and merges across a cut are not worth the memory.
_TRAIN_CHUNK_CHARS = 4096


def _spm():
    import sentencepiece  # lazy: importing engine must not require it until a tokenizer is used

    return sentencepiece


def _is_file_item(item) -> bool:
    if isinstance(item, os.PathLike):
        return True
    # A str names a file only when it plausibly is a path and that file exists; anything else
    # (including multi-line text) is training text.
    return isinstance(item, str) and "\n" not in item and len(item) < 4096 and os.path.isfile(item)


def _read_lines(path) -> Iterator[str]:
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        # Binary lines split on b"\n" only, so "\r" and other separators stay inside the text.
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line") from None


def _training_sentences(files_or_texts) -> Iterator[str]:
    """Yield training 'sentences': lines of the files / texts, newlines kept, long lines chunked."""
    if isinstance(files_or_texts, (str, os.PathLike)):
        # One argument: a path, or (if it spans several lines) a text.
        if not _is_file_item(files_or_texts) and not (
            isinstance(files_or_texts, str) and "\n" in files_or_texts
        ):
            raise FileNotFoundError(f"tokenizer training file not found: {files_or_texts}")
        files_or_texts = [files_or_texts]
    for item in files_or_texts:
        if _is_file_item(item):
            if not os.path.isfile(item):
                raise FileNotFoundError(f"tokenizer training file not found: {item}")
            lines: Iterable[str] = _read_lines(item)
        elif isinstance(item, str):
            lines = item.splitlines(keepends=True)
        else:
            raise TypeError(f"Tokenizer.train expects file paths or str texts, got {type(item).__name__}")
        for line in lines:
            for i in range(0, len(line), _TRAIN_CHUNK_CHARS):
                yield line[i : i + _TRAIN_CHUNK_CHARS]


def _model_path(path) -> Path:
    """A .model file, or a directory holding tokenizer.model."""
    p = Path(path)
    return p / MODEL_FILENAME if p.is_dir() else p


class Tokenizer:
    """A thin wrapper around ``sentencepiece.SentencePieceProcessor`` holding the model bytes."""

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = _spm().SentencePieceProcessor(model_proto=self._proto)
        got = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id())
        if got != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise ValueError(
                f"tokenizer model has special ids pad/bos/eos/unk={got}, expected "
                f"{(PAD_ID, BOS_ID, EOS_ID, UNK_ID)}; train it with Tokenizer.train"
            )
        # Byte pieces of "▁" if the model has byte fallback (always true for models trained here).
        ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]
        self._mark_ids = ids if UNK_ID not in ids else None

    # ---------------------------------------------------------------- construction / storage
    @classmethod
    def train(
        cls,
        files_or_texts,
        model_prefix_or_dir=None,
        vocab_size: int = 8000,
        model_type: str = "bpe",
        *,
        character_coverage: float = 0.9995,
        user_defined_symbols: Sequence[str] = ("\n",),
        num_threads: int = 2,
        **spm_options,
    ) -> "Tokenizer":
        """Train a tokenizer.

        files_or_texts: a path (str / PathLike, ``.gz`` allowed), or an iterable whose items are
            paths (PathLike objects, or str naming an existing file) or str texts.
        model_prefix_or_dir: None (keep in memory only), an existing directory or a path ending in
            a separator (writes ``<dir>/tokenizer.model``), a path ending in ``.model``, or a
            SentencePiece-style prefix (writes ``<prefix>.model``).
        spm_options: extra ``SentencePieceTrainer`` options (e.g. ``input_sentence_size`` with
            ``shuffle_input_sentence=True`` and a fixed seed for very large corpora).
        """
        spm = _spm()
        options = dict(
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", unk_piece="<unk>",
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16,
            character_coverage=character_coverage,
            user_defined_symbols=list(user_defined_symbols),
            num_threads=num_threads,
            # Use every sentence, in order: no sampling, so the result is reproducible.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            # A small corpus may not support the requested size; give a smaller vocab, not an error.
            hard_vocab_limit=False,
            minloglevel=2,
        )
        options.update(spm_options)
        seed = options.pop("seed", 0)
        spm.set_random_generator_seed(seed)
        buf = io.BytesIO()
        sentences = _training_sentences(files_or_texts)
        first = next(sentences, None)
        if first is None:
            raise ValueError("Tokenizer.train: no training text (all inputs are empty)")

        errors: list[Exception] = []

        def chained():
            # An exception raised inside the iterator would reach us wrapped in sentencepiece's
            # RuntimeError; stop the iteration instead and re-raise the original afterwards.
            try:
                yield first
                yield from sentences
            except (OSError, ValueError) as e:
                errors.append(e)

        try:
            spm.SentencePieceTrainer.train(sentence_iterator=chained(), model_writer=buf, **options)
            if errors:
                raise errors[0]
        except RuntimeError as e:
            if errors:
                raise errors[0] from None
            if "required_chars" in str(e):
                # The vocab must hold 4 specials + 256 byte pieces + user symbols + kept characters.
                raise ValueError(
                    f"Tokenizer.train: vocab_size={options['vocab_size']} is too small for this "
                    f"text: {str(e).split('Vocabulary size is smaller than required_chars.')[-1].strip()}"
                ) from None
            raise
        tok = cls(buf.getvalue())
        if model_prefix_or_dir is not None:
            target = os.fspath(model_prefix_or_dir)
            if os.path.isdir(target) or target.endswith(("/", os.sep)):
                tok.save(target)
            else:
                tok._write(Path(target if target.endswith(".model") else target + ".model"))
        return tok

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Load from a ``.model`` file or a directory containing ``tokenizer.model``."""
        p = _model_path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no tokenizer model at {p}")
        try:
            return cls(p.read_bytes())
        except RuntimeError as e:  # sentencepiece's parse error says nothing about the file
            raise ValueError(f"{p}: not a sentencepiece model ({e})") from None

    def save(self, directory) -> Path:
        """Write ``<directory>/tokenizer.model`` (creating the directory) and return its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        return self._write(d / MODEL_FILENAME)

    def _write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self._proto)
        os.replace(tmp, path)  # atomic: a crash never leaves a truncated model behind
        return path

    @property
    def model_proto(self) -> bytes:
        return self._proto

    # Picklable (DataLoader workers, multiprocessing): ship the bytes, rebuild the processor.
    def __getstate__(self):
        return {"proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["proto"])

    # ---------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    # ---------------------------------------------------------------- encode / decode
    def _encode_one(self, s: str) -> list[int]:
        if _SPACE_MARK not in s or self._mark_ids is None:
            return self._sp.encode(s)
        # SentencePiece would read a literal "▁" as a space; encode the text around it normally
        # and the character itself as its UTF-8 byte pieces, which decode back to "▁".
        out: list[int] = []
        for i, part in enumerate(s.split(_SPACE_MARK)):
            if i:
                out.extend(self._mark_ids)
            if part:
                out.extend(self._sp.encode(part))
        return out

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(s).__name__}")
        ids = self._encode_one(s)
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        for i, s in enumerate(texts):
            if not isinstance(s, str):
                raise TypeError(f"Tokenizer.encode_batch: item {i} is {type(s).__name__}, expected str")
        texts = list(texts)
        # sentencepiece's list API encodes in parallel in C++; only texts containing "▁" need
        # the slow path.
        special = [i for i, s in enumerate(texts) if _SPACE_MARK in s]
        out = self._sp.encode(texts) if texts else []
        for i in special:
            out[i] = self._encode_one(texts[i])
        if bos or eos:
            out = [([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else []) for ids in out]
        return out

    def decode(self, ids) -> str:
        """Decode ids (list / numpy / torch 1-D); PAD, BOS and EOS are skipped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"Tokenizer.decode: id {i} out of range [0, {n})")
        return self._sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)])

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]
