"""Problems: their records and prompts, their sources (a registry), gold answers and the training data module."""
