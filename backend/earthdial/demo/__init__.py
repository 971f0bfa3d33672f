"""The demo model's world: synthetic overhead scenes and sample scenes to try the tool on. The shipped micro
checkpoint itself is data, in models/demo: its folder's name, `demo`, is the model's name (adapters record it)."""
