"""One `Tokenizer` over Hugging Face `tokenizers` (tokenizer.json) and `sentencepiece` (tokenizer.model).

Conventions (AMD / LLaMA-2): documents are encoded without BOS and end with EOS
(`encode(text, eos=True)`); prompts for generation are encoded as the model was trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from slm.errors import SlmError


class Tokenizer:
    """Encode/decode text; knows its special ids. Load with `Tokenizer.load(dir_or_file)`."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_id: int | None, path: Path):
        self._backend = backend
        self.kind = kind  # "hf" (tokenizer.json) or "spm" (tokenizer.model)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.path = path

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
            out = [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        else:
            out = self._backend.EncodeAsIds(texts)
        pre = [self.bos_id] if bos and self.bos_id is not None else []
        post = [self.eos_id] if eos and self.eos_id is not None else []
        return [pre + ids + post for ids in out] if (pre or post) else out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.kind == "hf":
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._backend.DecodeIds(list(ids))

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
