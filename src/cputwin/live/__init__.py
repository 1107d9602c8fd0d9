"""Live: the twin running beside the machine, one sample at a time."""
