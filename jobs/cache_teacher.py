"""`python -m jobs.cache_teacher --config KD.yaml teacher.cache=DIR [key=value ...]`: a frozen teacher's outputs for
every step of the run, stored once in teacher.cache for the runs and sweeps that share them."""

import sys

from ray_kd.cli import run

if __name__ == "__main__":
    run(["cache-teacher", *sys.argv[1:]])
