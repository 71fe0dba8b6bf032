"""Tasks with verifiable rewards and the reward functions that score them."""
