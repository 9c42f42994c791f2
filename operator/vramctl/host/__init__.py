"""The host beside the GPU: /proc readers and the host memory that sleeping
and checkpointed models are budgeted against."""
