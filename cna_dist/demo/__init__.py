"""The demo's models, built in code: word tables, a word-level chat tokenizer, random and planted checkpoints.

Tests and `cna-dist demo` use them; nothing in the pipeline imports this package.
"""
