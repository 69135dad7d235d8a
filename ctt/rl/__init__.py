"""REINFORCE for the continue-thinking row: advantages, the scored choices and their log-probs, the loss."""
