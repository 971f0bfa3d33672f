"""The `earthdial` command line."""
