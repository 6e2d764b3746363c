"""Accuracy metrics (dataset-level confusion matrices)."""
