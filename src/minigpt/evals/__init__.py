"""Evaluations of a trained model: one module per task (hellaswag, loss)."""
