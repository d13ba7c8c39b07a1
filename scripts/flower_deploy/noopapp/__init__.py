"""No-op Flower App for the round-overhead comparison."""
