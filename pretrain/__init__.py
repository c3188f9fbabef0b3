"""Distributed continual pre-training with DeepSpeed ZeRO and MIGU gradient masking."""

from pretrain import deepspeed_import

__version__ = "0.1.0"

deepspeed_import.install()  # before anything imports deepspeed
