"""vramctl: one GPU, several heavy model servers, exactly one of them at a time."""

__version__ = "0.1.0"
