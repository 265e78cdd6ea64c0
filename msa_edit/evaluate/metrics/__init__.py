"""`evaluate` metric modules shipped as local files: load one with `evaluate.load(str(path))`."""
