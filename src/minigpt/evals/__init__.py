"""Evaluations of a trained model: validation loss (loss), the multiple-choice benchmarks (one
scoring core in scoring/multiple_choice, one module per task family, the suite) and a bridge to
lm-evaluation-harness (harness)."""
