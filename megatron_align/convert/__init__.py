"""megatron <-> Hugging Face conversion (GPT-NeoX, Llama) with logit-parity verification.

Kept import-light (the CLI imports this package to register its verbs); the library entry
points load on first use:

    from megatron_align.convert import export_checkpoint, import_hf
"""
from .errors import ConvertError, VerificationFailed


def __getattr__(name):
    if name == "export_checkpoint":
        from .export import export_checkpoint

        return export_checkpoint
    if name == "import_hf":
        from .hf_import import import_hf

        return import_hf
    raise AttributeError(name)


__all__ = ["ConvertError", "VerificationFailed", "export_checkpoint", "import_hf"]
