"""Our Flax implementations of the paper's model families, and loaders for real checkpoints."""
