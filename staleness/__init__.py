"""Staleness control (docs/design.md section 5): admission, policy versions, accounting."""
