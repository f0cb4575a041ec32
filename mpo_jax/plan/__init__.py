"""Planning a TPU run from a CPU host: every program of one update compiled for an abstract topology."""
