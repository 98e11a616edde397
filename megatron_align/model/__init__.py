"""Architecture presets -> megatron-core TransformerConfig, layer specs and GPTModel chunks."""
from .presets import SIZES, Architecture, padded_vocab_size, resolve_architecture
