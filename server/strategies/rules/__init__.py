"""One module per aggregation rule; ``registry.py`` binds them to the run-config names."""
