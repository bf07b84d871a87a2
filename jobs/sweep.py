"""`python -m jobs.sweep --config RUN.yaml --space SPACE.yaml [key=value ...]`: a Ray Tune sweep on the cluster."""

import sys

from ray_kd.cli import run

if __name__ == "__main__":
    run(["tune", *sys.argv[1:]])
