"""Loading the frozen model (a registry of sources), the tiny test model, the continue-thinking token overlay and the model card."""
