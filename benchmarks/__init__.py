"""Side-by-side benchmarks of effax against hand-written JAX and its peers; run `python benchmarks/run.py`."""
