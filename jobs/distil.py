"""`python -m jobs.distil --config RUN.yaml [key=value ...]`: one distillation run on the cluster it is submitted to.

Under `ray job submit` RAY_ADDRESS names the cluster and MLFLOW_TRACKING_URI (from the job's
runtime env) the store; both reach every worker. Resubmitting with the same run name resumes.
"""

import sys

from ray_kd.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
