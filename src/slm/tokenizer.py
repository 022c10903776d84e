"""One `Tokenizer` over Hugging Face `tokenizers` (tokenizer.json) and `sentencepiece` (tokenizer.model).

Conventions (AMD / LLaMA-2): documents are encoded without BOS and end with EOS
(`encode(text, eos=True)`); prompts for generation are encoded as the model was trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from slm.atomic import write_bytes, write_json, write_text
from slm.errors import SlmError


class Tokenizer:
    """Encode/decode text; knows its special ids. Load with `Tokenizer.load(dir_or_file)`."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_id: int | None, path: Path):
        self._backend = backend
        self.kind = kind  # "hf" (tokenizer.json) or "spm" (tokenizer.model)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.path = path
        # Threads for one encode_batch call (None: the backend's default, all cores). Worker
        # processes set 1 so that N workers use N cores. HF `tokenizers` follows the
        # TOKENIZERS_PARALLELISM environment variable instead.
        self.threads: int | None = None

    # --- loading --------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a model directory, a tokenizer.json, or a SentencePiece tokenizer.model."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return cls._from_hf(path / "tokenizer.json")
            if (path / "tokenizer.model").is_file():
                return cls._from_spm(path / "tokenizer.model")
            raise SlmError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
        if not path.is_file():
            raise SlmError(f"{path}: no such tokenizer file or directory")
        if path.suffix == ".json":
            return cls._from_hf(path)
        if path.suffix == ".model":
            return cls._from_spm(path)
        raise SlmError(f"{path}: expected tokenizer.json, tokenizer.model or a directory holding one")

    @classmethod
    def _from_hf(cls, path: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise SlmError(f"{path}: cannot load tokenizer ({e})") from None
        bos, eos = _special_ids_from_config(path.parent, tok)
        return cls(tok, "hf", bos, eos, path)

    @classmethod
    def _from_spm(cls, path: Path) -> "Tokenizer":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise SlmError(f"{path}: cannot load SentencePiece model ({e})") from None
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
        eos = sp.eos_id() if sp.eos_id() >= 0 else None
        return cls(sp, "spm", bos, eos, path)

    # --- use ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        if self.kind == "hf":
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.GetPieceSize()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if self.kind == "hf":
            ids = self._backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self._backend.EncodeAsIds(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        if self.kind == "hf":  # the Rust backend parallelises a batch
            # The "fast" variant skips character offsets (we never use them): same ids, less work.
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            out = [e.ids for e in encode(texts, add_special_tokens=False)]
        else:  # SentencePiece threads a list unless told otherwise; see `threads`
            out = self._backend.Encode(texts, out_type=int, num_threads=self.threads or -1)
        pre = [self.bos_id] if bos and self.bos_id is not None else []
        post = [self.eos_id] if eos and self.eos_id is not None else []
        return [pre + ids + post for ids in out] if (pre or post) else out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.kind == "hf":
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._backend.DecodeIds(list(ids))

    def parse_special_tokens(self, enabled: bool) -> None:
        """Whether special-token strings in text (a literal "</s>") become special ids.

        On by default (chat prompts rely on it). Data preparation turns it off so that a
        document quoting "</s>" is tokenized as text, as SentencePiece always does.
        """
        if self.kind == "hf":
            self._backend.encode_special_tokens = not enabled

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "hf":
            return self._backend.token_to_id(token)
        i = self._backend.PieceToId(token)
        return None if i == self._backend.unk_id() and token != self._backend.IdToPiece(i) else i

    def id_to_token(self, i: int) -> str | None:
        if self.kind == "hf":
            return self._backend.id_to_token(i)
        return self._backend.IdToPiece(i)


def _special_ids_from_config(model_dir: Path, tok) -> tuple[int | None, int | None]:
    """BOS/EOS ids: from tokenizer_config.json / config.json when present, else LLaMA's names."""
    bos = eos = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = model_dir / name
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            for key, slot in (("bos_token", "bos"), ("eos_token", "eos")):
                v = cfg.get(key)
                if isinstance(v, dict):
                    v = v.get("content")
                if isinstance(v, str) and tok.token_to_id(v) is not None:
                    if slot == "bos" and bos is None:
                        bos = tok.token_to_id(v)
                    if slot == "eos" and eos is None:
                        eos = tok.token_to_id(v)
    if bos is None:
        bos = tok.token_to_id("<s>")
    if eos is None:
        eos = tok.token_to_id("</s>")
    return bos, eos


# --- training a LLaMA-2-style tokenizer --------------------------------------------------------

# LLaMA-2's tokenizer.model trainer/normalizer settings (read from its TrainerSpec), except
# the corpus-size knobs: BPE with byte fallback, digits split, whitespace kept as is.
LLAMA2_TRAINER_SPEC = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_number=True,
    split_by_whitespace=True,
    treat_whitespace_as_suffix=False,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    character_coverage=0.99995,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    unk_piece="<unk>",
    bos_piece="<s>",
    eos_piece="</s>",
    max_sentence_length=4192,
    shuffle_input_sentence=True,
)


def _training_lines(inputs: list[Path], max_line_bytes: int):
    """Lines of every input file (folders: every file inside, sorted); non-UTF-8 files are skipped."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise SlmError(f"--input {p}: no such file or directory")
    if not files:
        raise SlmError(f"--input {', '.join(map(str, inputs))}: no files to train on")
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            if line.strip() and len(line) <= max_line_bytes:
                yield line


def train_tokenizer(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    vocab_size: int = 32000,
    max_sentences: int = 2_000_000,
    threads: int | None = None,
) -> Path:
    """Train a LLaMA-2-style SentencePiece BPE tokenizer (<unk>=0, <s>=1, </s>=2, byte fallback).

    Writes OUT/tokenizer.model plus the Hugging Face files (tokenizer.json,
    tokenizer_config.json, special_tokens_map.json) so that both `Tokenizer.load(OUT)`
    and `transformers.AutoTokenizer.from_pretrained(OUT)` load it. `max_sentences`
    lines (a random sample when there are more) bound the trainer's memory.
    """
    import io

    import sentencepiece as spm

    out = Path(out)
    model = io.BytesIO()
    spec = dict(LLAMA2_TRAINER_SPEC, vocab_size=vocab_size, input_sentence_size=max_sentences)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines([Path(p) for p in inputs], spec["max_sentence_length"]),
            model_writer=model,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
            **spec,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is too high" for a small corpus
        raise SlmError(f"tokenizer training failed: {str(e).strip().splitlines()[0]}") from None
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "tokenizer.model", model.getvalue())
    write_hf_tokenizer_files(out / "tokenizer.model", out)
    return out


def llama_bpe_tokenizer(
    pieces: list[str], scores: list[float], mergeable: list[bool], unk_id: int, bos_id: int, eos_id: int,
    add_dummy_prefix: bool = True,
):
    """A `tokenizers.Tokenizer` that encodes exactly like a LLaMA SentencePiece BPE vocabulary.

    `pieces` and `scores` in id order; `mergeable[i]` is False for control, unknown and
    byte-fallback pieces. Merges are recovered from the vocabulary as transformers'
    SentencePieceExtractor does and ranked by the merged piece's score (SentencePiece
    merges the best-scoring pair first; LLaMA-2 gives its whitespace runs -1e9, so id
    order is not enough), ties by id.
    """
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece, pid in vocab.items():
        if mergeable[pid]:
            pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            merges.extend(sorted(pairs, key=lambda lr: (vocab[lr[0]], vocab[lr[1]])))
    merges.sort(key=lambda lr: (-scores[vocab[lr[0] + lr[1]]], vocab[lr[0] + lr[1]]))  # stable within a piece
    unk, bos, eos = pieces[unk_id], pieces[bos_id], pieces[eos_id]
    tok = HFTokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # SentencePiece always adds the dummy "▁" prefix (even before a leading space) and merges
    # across the whole string: a normalizer, not a Metaspace pre-tokenizer, does exactly that.
    # (add_dummy_prefix=False: a model trained without it, as GGUF's tokenizer.ggml.add_space_prefix says.)
    prefix = [normalizers.Prepend("▁")] if add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_dummy_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (unk, bos, eos)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return tok


def write_hf_tokenizer_files(model_file: str | os.PathLike, out: str | os.PathLike) -> None:
    """tokenizer.json (+ config files) equivalent to a LLaMA-style SentencePiece BPE model.

    The conversion (`llama_bpe_tokenizer`) follows transformers' LlamaConverter but needs
    neither protobuf nor transformers.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    tok = llama_bpe_tokenizer(
        pieces=[sp.id_to_piece(i) for i in range(n)],
        scores=[sp.get_score(i) for i in range(n)],
        mergeable=[not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)) for i in range(n)],
        unk_id=sp.unk_id(),
        bos_id=sp.bos_id(),
        eos_id=sp.eos_id(),
    )
    unk, bos, eos = sp.id_to_piece(sp.unk_id()), sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id())
    out = Path(out)
    write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    # Not "LlamaTokenizer": transformers 5 rebuilds that class's pre-tokenizer (Metaspace, which
    # adds no "▁" before a leading space) and so disagrees with SentencePiece on " x"; the
    # generic fast class runs tokenizer.json as written, id for id like tokenizer.model.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    write_json(out / "tokenizer_config.json", config)
    special = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    write_json(out / "special_tokens_map.json", special)
