"""The durable store-and-forward buffer."""
