"""The only subpackage importing transformers/peft: load models, host LoRA adapters, export them."""

from fedrank.models.loading import (
    SMOLLM2,
    LoadedModel,
    ModelNotFoundError,
    load_causal_lm,
    release_memory,
    smollm2_gguf,
    smollm2_shaped_llama,
    tiny_llama,
    tiny_tokenizer,
)
from fedrank.models.lora import DEFAULT_TARGETS, LoraHost, changes_base, export_peft_adapter
from fedrank.models.onednn import use_onednn, uses_onednn

__all__ = [
    "DEFAULT_TARGETS",
    "SMOLLM2",
    "LoadedModel",
    "LoraHost",
    "ModelNotFoundError",
    "changes_base",
    "export_peft_adapter",
    "load_causal_lm",
    "release_memory",
    "smollm2_gguf",
    "smollm2_shaped_llama",
    "tiny_llama",
    "tiny_tokenizer",
    "use_onednn",
    "uses_onednn",
]
