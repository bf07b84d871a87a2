"""Killing a role worker mid-run, as a crash or the OOM killer would."""

import os
import signal
import threading
import time
from typing import Callable


def kill_a_role_worker_when(ready: Callable[[], bool], ray_module, killed: list[int]) -> threading.Thread:
    """A started thread that waits (up to 300 s) until `ready()`, then SIGKILLs one live RoleWorker of the test
    session's cluster and appends its pid to `killed`; join it after the run."""
    from ray.util.state import list_actors

    def kill() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not ready():
            time.sleep(0.1)
        workers = list_actors(address=ray_module.get_runtime_context().gcs_address,
                              filters=[("class_name", "=", "RoleWorker"), ("state", "=", "ALIVE")])
        os.kill(workers[-1].pid, signal.SIGKILL)
        killed.append(workers[-1].pid)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread
