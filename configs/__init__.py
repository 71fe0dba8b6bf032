"""Hydra structured configs: every default lives here; YAML groups pick models and tasks."""
