"""Configuration: Hydra glue (the conf dir, resolvers, lists) and the start-up check of the whole config."""
