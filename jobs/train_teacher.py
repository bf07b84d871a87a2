"""`python -m jobs.train_teacher --config TEACHER.yaml --out PATH [key=value ...]`: train and save a teacher."""

import sys

from ray_kd.cli import run

if __name__ == "__main__":
    run(["train-teacher", *sys.argv[1:]])
