"""ctt: learn a continue-thinking token by RL with budget forcing in the loop."""
