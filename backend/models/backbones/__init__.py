"""Frozen foundation encoders loaded from their official checkpoints."""
