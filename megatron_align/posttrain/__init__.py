"""Post-training on exported HF models: DPO with TRL (SFT runs on the megatron trainer,
``data.source: sft``)."""
