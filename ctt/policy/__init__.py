"""The policy: the frozen model plus its token, answering problems with budget-forced rollouts in a mode."""
