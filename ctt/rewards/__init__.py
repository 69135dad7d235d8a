"""Rewards: what is graded in a rollout and how it scores (a registry of typed reward groups)."""
