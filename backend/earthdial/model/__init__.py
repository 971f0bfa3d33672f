"""The model: EarthDial checkpoints, their tokens and prompts, pixels for the vision tower, the generation
engine and what its answers say. Knows nothing of rasters, files or the server."""
