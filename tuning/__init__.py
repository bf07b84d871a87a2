"""Hyper-parameter sweeps with Ray Tune: search spaces (`tuning/spaces/*.yaml`) and the driver (`sweep.py`)."""
