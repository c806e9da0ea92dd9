"""fedrank: federated LoRA fine-tuning of LLMs for clients with different LoRA ranks."""

__version__ = "0.1.0"
