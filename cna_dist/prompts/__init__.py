"""Prompts: sets and tables read from any URI, hashed, rendered with the chat template, batched by length."""
