"""tools/: what a user runs around the method, not the method: benchmarks (`bench.py`), cost estimates
(`estimate.py`) and the demo's longer runs (`demo_runs.py`). Each file puts the repository's top level on
sys.path, so it runs as `python tools/NAME.py` from anywhere."""
