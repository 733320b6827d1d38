"""Formats of other tools: Hugging Face `transformers` (import and export) and their tokenizer files."""
