"""Getting set up: published checkpoints from the hub, and what this machine can run."""
