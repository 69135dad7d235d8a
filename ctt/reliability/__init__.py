"""Reliability: one live process per run dir, resuming, safe loading, crash-safe checkpoints, the resumable logger."""
