"""Evaluation: modes x N with pass@1 and CIs, paired comparisons and their statistics, plots, run dirs read back."""
