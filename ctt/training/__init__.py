"""Training: the LightningModule that runs rollout -> reward -> advantage -> loss, and multi-process support."""
