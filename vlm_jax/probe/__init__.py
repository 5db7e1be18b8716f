"""Features, linear probes and dense heads (see features.py, linear.py, dense.py)."""
