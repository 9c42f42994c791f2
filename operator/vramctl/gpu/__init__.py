"""The GPU port: how much memory is used, and by whom."""
