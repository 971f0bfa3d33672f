"""The backend's contract modules, copied in by scripts/build_plugin.py (never edited here)."""
