"""Checkpoints: built-in tiny models, model and tokenizer loading, quantization configs."""
