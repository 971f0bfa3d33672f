"""Whole scenes: laying a region out in tiles, running the model over them, merging boxes across tile
seams, journals that let a stopped scan resume, and archives of many scenes (Ray)."""
