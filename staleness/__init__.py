"""Staleness control (DESIGN.md section 5): admission, policy versions, accounting."""
