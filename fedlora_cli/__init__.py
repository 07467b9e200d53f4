"""fedlora: federated fine-tuning of small language models with LoRA."""

__version__ = "0.1.0"
