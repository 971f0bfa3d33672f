"""Whole scenes: the scene runner lays a region out in model-sized tiles, reads them ahead of the model,
runs them in batches and merges boxes across tile seams."""
