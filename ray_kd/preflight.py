"""Checks the driver runs before any worker starts, so bad input fails in seconds with one line.

The data must load and fit every role and weight file (`check_roles`); every folder the
run writes must be writable and the MLflow sqlite store's folder too (checked by writing,
since permission bits say nothing to root or on a read-only mount); a cluster address must
answer within seconds (a dead head otherwise hangs `ray.init` for minutes).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from ray_kd.config import ConfigError, RunConfig, shown_uri, storage_mirror, uri_scheme
from ray_kd.data import Dataset
from ray_kd.errors import UserError
from ray_kd.evaluation import frozen_module
from ray_kd.models.external import is_external, role_field
from ray_kd.roles import all_roles
from ray_kd.teacher_cache import CACHE_NEEDS_FROZEN
from ray_kd.weights import load_backbone

ADDRESS_TIMEOUT_S = 5.0


class PreflightError(UserError, RuntimeError):
    """A folder the run cannot write, or a cluster it cannot reach."""


def check_roles(cfg: RunConfig, data: Dataset) -> None:
    """The method takes these roles on this data, and every weight file was trained for it."""
    method, roles = cfg.method.build(), all_roles(cfg)
    try:
        method.check_roles(roles, data.num_classes, data.in_channels)
    except ValueError as err:
        raise ConfigError(f"config error: {err}") from None
    for role in roles:  # an external model is built once here too: a 1-channel dataset or bad kwargs fail now
        if role.checkpoint is not None or is_external(role.model):
            try:
                backbone = load_backbone(role, data.num_classes, method.input_channels(role, data.in_channels))
            except UserError:
                raise
            except (ValueError, TypeError) as err:
                raise ConfigError(f"config error at {role_field(role)}: {str(err).splitlines()[0]}") from None
            if role.is_teacher and cfg.teacher.cache is not None:
                check_cacheable(cfg, method.build_role(role, backbone, data.num_classes), data.num_classes)
        if role.checkpoint is not None:
            note_normalisation(role, data)


def note_normalisation(role, data) -> None:
    """A ray-kd file records the mean/std its images were normalised with; a run that normalises otherwise feeds
    the role other inputs than it learnt on (e.g. a teacher fine-tuned from pretrained weights with their ImageNet
    mean/std, distilled on a run measuring its own): said in a line, with the setting that matches."""
    from ray_kd.checkpoint import safe_load

    if Path(role.checkpoint).suffix == ".safetensors":
        return
    blob = safe_load(role.checkpoint)
    prep = blob.get("preprocessing") if isinstance(blob, dict) else None
    if not isinstance(prep, dict) or len(prep.get("mean", ())) != len(data.mean):
        return
    here = [[round(float(v), 4) for v in t] for t in (data.mean, data.std)]
    trained = [[round(float(v), 4) for v in prep[k]] for k in ("mean", "std")]
    if any(abs(a - b) > 1e-3 for x, y in zip(here, trained) for a, b in zip(x, y)):
        print(f"{role.name}: {Path(role.checkpoint).name} learnt on images normalised with mean {trained[0]} std "
              f"{trained[1]}, this run normalises with mean {here[0]} std {here[1]}; to feed it as it learnt, set "
              f"data.normalize=[{trained[0]},{trained[1]}]", flush=True)


def check_cacheable(cfg: RunConfig, teacher, num_classes: int) -> None:
    """teacher.cache keeps a frozen teacher's outputs (all of them, or the top-k of the classes there are)."""
    if not frozen_module(teacher):
        raise ConfigError(CACHE_NEEDS_FROZEN.format(method=cfg.method.name))
    if cfg.teacher.cache_topk is not None and cfg.teacher.cache_topk > num_classes:
        raise ConfigError(f"config error at teacher.cache_topk: {cfg.teacher.cache_topk} is more than the data's "
                          f"{num_classes} classes; set it below {num_classes} or remove it")


def check_writable(folder: str | Path, field: str) -> None:
    """Create `folder` if needed and write a file in it; one line naming `field` if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ray-kd-write-test"):
            pass
    except OSError as err:
        raise PreflightError(f"{field}={folder} is not a writable folder ({err.strerror or err}); "
                             f"point {field} at a folder this user can write") from None


def check_folders(cfg: RunConfig) -> None:
    """Every place the run writes: output_dir and teacher.cache (a folder, or an object store written to once),
    and data.cache_dir, where every dataset caches its val split."""
    from ray_kd import storage

    teacher_cache = cfg.teacher.cache if cfg.teacher is not None else None
    for location, field in ((cfg.output_dir, "output_dir"), (cfg.data.cache_dir, "data.cache_dir"),
                            (teacher_cache, "teacher.cache")):
        if location is None:
            continue
        if uri_scheme(str(location)) is None:
            check_writable(location, field)
        else:
            storage.check_writable(location, field)
            if field == "output_dir":  # the run folder is written here first, then copied to the store
                mirror = storage_mirror(location)
                try:
                    check_writable(mirror, "RAY_KD_STORAGE_CACHE")
                except PreflightError:
                    raise PreflightError(f"{mirror}, where a run on {shown_uri(location)} keeps its local copy, "
                                         "is not a writable folder; point RAY_KD_STORAGE_CACHE at a folder this "
                                         "user can write") from None


def check_sqlite_store(uri: str) -> None:
    """A sqlite MLflow store needs to write its database (and its mlruns/ artifacts) in that folder."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return
    database = Path(uri[len(prefix):])
    try:
        check_writable(database.parent, "the MLflow store folder")
        if database.exists() and not os.access(database, os.W_OK):
            raise PermissionError(f"{database} is read-only")
    except (PreflightError, PermissionError) as err:
        raise PreflightError(f"MLflow store {uri} cannot be written ({err}); set MLFLOW_TRACKING_URI or "
                             "tracking.uri to a store in a writable folder") from None


def check_out_file(out: Path) -> None:
    """`train-teacher --out` names a file to write, not a folder."""
    if out.is_dir():
        raise PreflightError(f"--out {out} is a folder; give a file path such as {out / 'teacher.pt'}")
    check_writable(out.parent, "--out's folder")


def cluster_address(cfg) -> str | None:
    """The cluster a Ray run joins: runtime.address, else RAY_ADDRESS (set under `ray job submit`); None: start one
    (as Ray's own `local` asks)."""
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    return None if address == "local" else address


def running_cluster() -> str | None:
    """The address of the cluster a plain `ray.init()` would join, the last `ray start` on this machine (Ray's
    address file), if it answers; None when there is none or it is gone (its head killed, the file left)."""
    from ray._private.services import find_bootstrap_address

    address = find_bootstrap_address(None)
    return address if address and answers(address, timeout=1) else None


def answers(hostport: str, timeout: float) -> bool:
    """Whether `host:port` accepts a TCP connection within `timeout` seconds."""
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def check_address(address: str | None) -> None:
    """A `host:port` (or `ray://host:port`) cluster address must accept a connection within seconds, and a head's
    GCS must answer this process (`check_head`); `auto` must find a cluster started on this machine (then it is
    probed the same way)."""
    if not address:
        return
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            address = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError:
            raise PreflightError("runtime.address=auto found no Ray cluster on this machine; start one (`ray start "
                                 "--head`) or unset runtime.address and RAY_ADDRESS to start a local one") from None
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PreflightError(f"runtime.address={address!r} is not host:port (e.g. 10.0.0.5:6379, "
                             "ray://10.0.0.5:10001 or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S):
            pass
    except OSError as err:
        raise PreflightError(f"no Ray cluster answers at runtime.address={address} ({err.strerror or err}); start "
                             "it (`ray start --head`), fix the address, or unset it to start a local cluster") from None
    if "://" not in address:  # a head's GCS (ray:// is Ray Client's server, which asks nothing of this kind)
        check_head(hostport, address)


def check_head(hostport: str, address: str) -> None:
    """Ask the head's GCS for its cluster id once, with the token `ray.init` would send (with RAY_AUTH_MODE=token:
    RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; none otherwise): `ray.init` retries a refused token, or
    a port where something other than a Ray head answers, for 20 s with a warning each second, then says only that
    it found no cluster."""
    import grpc
    from ray._raylet import AuthenticationTokenLoader
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    loader = AuthenticationTokenLoader.instance()
    token = tuple(loader.get_token_for_http_header().items()) if loader.has_token() else ()
    with grpc.insecure_channel(hostport) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=ADDRESS_TIMEOUT_S, metadata=token)
            return
        except grpc.RpcError as err:
            code = err.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        refused = "refused this process's token" if token else "refused this process, which sends no token"
        raise PreflightError(f"the Ray cluster at runtime.address={address} uses token authentication and {refused}; "
                             "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` "
                             "on its head prints it), or point RAY_AUTH_TOKEN_PATH at a file holding it")
    what = (f"nothing answered within {ADDRESS_TIMEOUT_S:g} s" if code == grpc.StatusCode.DEADLINE_EXCEEDED
            else f"something there answered {code.name}, not as a Ray head")
    raise PreflightError(f"no Ray cluster answers at runtime.address={address} ({what}); start it (`ray start "
                         "--head`), fix the address, or unset it to start a local cluster")
