"""Trainer side of tether: losses, advantages, batch-size invariance, the trainer worker and the loop."""
