"""Distributed continual pre-training with DeepSpeed ZeRO and MIGU gradient masking."""

__version__ = "0.1.0"
