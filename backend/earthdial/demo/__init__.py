"""The demo model's world: synthetic overhead scenes, sample scenes to try the tool on, and the shipped
micro checkpoint (demo/checkpoint)."""
