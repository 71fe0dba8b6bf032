"""Rollout side: engines, rollout workers, interruptible generation, weight receiving."""
