"""Exact, streaming folds of SO8T and LoRA adapters into Hugging Face checkpoints."""
