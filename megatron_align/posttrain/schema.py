"""Typed DPO configuration (``configs/posttrain/dpo.yaml``): every key, with its default.

The defaults are the paper's DPO settings where it states them (beta 5, LR 1e-6, one epoch);
the rest are common choices, marked as such.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Precision = Literal["auto", "fp32", "bf16"]
LRScheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
LossType = Literal["sigmoid", "ipo", "hinge", "robust"]  # TRL loss_type; sigmoid is DPO's


@dataclass
class DPOSettings:
    beta: float = 5.0  # paper
    lr: float = 1.0e-6  # paper
    epochs: float = 1.0  # paper
    batch_size: int = 32  # preference pairs per optimizer step, over all devices (not stated in the paper)
    micro_batch_size: int = 1  # pairs per forward pass per device; the rest is gradient accumulation
    max_length: int = 2048  # prompt + completion tokens; longer pairs keep their start
    lr_scheduler: LRScheduler = "linear"
    warmup_ratio: float = 0.1  # share of the steps with a linear warmup
    weight_decay: float = 0.0
    loss_type: LossType = "sigmoid"
    seed: int = 1234
    precision: Precision = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    margin_pairs: int = 256  # training pairs the summary's reward margin is measured on (0: none)
    chat_template: Optional[str] = None  # FILE or 'default', for a model whose tokenizer has none
