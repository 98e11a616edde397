"""One small interface over HF `tokenizer.json` files and SentencePiece `.model` files.

`load_tokenizer(path)` is what preprocess, inspect, the mixture layer and the trainer use; the
identity (`kind`, `sha256`, `vocab_size`, `eod_id`) goes into every stats sidecar so a dataset
can be checked against the tokenizer a run is configured with.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from typing import List, Optional

HF_EOD_TOKEN = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer file that cannot be loaded or has no usable end-of-document token."""


@lru_cache(maxsize=32)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    st = os.stat(path)
    return _file_sha256(os.path.abspath(path), st.st_mtime_ns, st.st_size)


class HFTokenizer:
    """A `tokenizers` (Rust) tokenizer loaded from a tokenizer.json file."""

    kind = "hf"

    def __init__(self, path: str, eod_token: Optional[str] = None):
        from tokenizers import Tokenizer

        self.path = path
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path}: not a loadable HF tokenizer.json ({exc})") from exc
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = self._resolve_eod(eod_token)
        self.sha256 = file_sha256(path)
        # encode_batch_fast skips offset tracking (tokenizers >= 0.21); ids are identical.
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def _resolve_eod(self, eod_token: Optional[str]) -> int:
        if eod_token is not None:
            eod = self._tok.token_to_id(eod_token)
            if eod is None:
                raise TokenizerError(f"{self.path}: --eod-token {eod_token!r} is not in the vocabulary")
            return eod
        eod = self._tok.token_to_id(HF_EOD_TOKEN)
        if eod is not None:
            return eod
        eos = self._eos_from_config()
        if eos is not None and self._tok.token_to_id(eos) is not None:
            return self._tok.token_to_id(eos)
        raise TokenizerError(
            f"{self.path}: no {HF_EOD_TOKEN!r} token and no eos token found; pass --eod-token TOKEN"
        )

    def _eos_from_config(self) -> Optional[str]:
        """The eos token named by a tokenizer_config.json beside the tokenizer.json, if any."""
        import json

        config_path = os.path.join(os.path.dirname(os.path.abspath(self.path)), "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                return eos
        for candidate in ("</s>", "<eos>", "<|eos|>", "<|end_of_text|>"):
            if self._tok.token_to_id(candidate) is not None:
                return candidate
        return None

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [enc.ids for enc in self._encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: List[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))


class SentencePieceTokenizer:
    """A SentencePiece `.model` file."""

    kind = "sentencepiece"

    def __init__(self, path: str, eod_token: Optional[str] = None):
        import sentencepiece as spm

        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as exc:
            raise TokenizerError(f"{path}: not a loadable SentencePiece model ({exc})") from exc
        self.vocab_size = self._sp.get_piece_size()
        if eod_token is not None:
            eod = self._sp.piece_to_id(eod_token)
            if eod == self._sp.unk_id() and eod_token != self._sp.id_to_piece(eod):
                raise TokenizerError(f"{path}: --eod-token {eod_token!r} is not in the vocabulary")
            self.eod_id = eod
        else:
            self.eod_id = self._sp.eos_id()
            if self.eod_id < 0:
                raise TokenizerError(
                    f"{path}: the SentencePiece model has no eos piece (eos_id = -1); pass --eod-token PIECE"
                )
        self.sha256 = file_sha256(path)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return self._sp.encode(texts, out_type=int)

    def decode(self, ids: List[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def load_tokenizer(path: str, eod_token: Optional[str] = None):
    """Load a tokenizer.json (HF) or a SentencePiece .model; a directory means its tokenizer.json."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise TokenizerError(f"{path}: directory has no tokenizer.json or tokenizer.model")
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: tokenizer file not found")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        return HFTokenizer(path, eod_token)
    return SentencePieceTokenizer(path, eod_token)


def tokenizer_identity(tok) -> dict:
    return {
        "kind": tok.kind,
        "path": os.path.abspath(tok.path),
        "sha256": tok.sha256,
        "vocab_size": int(tok.vocab_size),
        "eod_id": int(tok.eod_id),
    }
