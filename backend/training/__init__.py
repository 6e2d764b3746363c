"""Training: data sampling and the fine-tuning loop."""
