"""Errors of the conversion commands: one clear message, non-zero exit."""


class ConvertError(ValueError):
    """Bad input to export/import (missing tokenizer, wrong vocab, unsupported architecture...)."""


class VerificationFailed(RuntimeError):
    """Exported/imported weights do not reproduce the source model's logits."""
