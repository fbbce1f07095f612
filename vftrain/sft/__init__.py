"""Supervised fine-tuning: the trainer (the data path, loss and logging live in their own modules)."""
