"""Files on an object store (s3://, gs://, abfs://, hdfs://: what pyarrow.fs opens): a run folder, a teacher cache.

A run folder (`output_dir: s3://bucket/prefix`, see `ray_kd.run_storage`): every process works on a local mirror
of it (plain files as for a local output_dir), and the store holds the truth:
- Checkpoints: each rank uploads its own roles' files of an epoch straight to the store; once every rank has
  (the group's barrier), rank 0 uploads the epoch's manifest and history, which publishes it (an object store
  has no folder rename). A process reads checkpoints through its mirror, downloaded when first asked for, so a
  run resumes on whichever node or machine its ranks land on.
- The driver's own files (fingerprint, MLflow run marker, wall time, summary, best student, plot) are pulled
  when a run starts and pushed as they change.
The run's lock stays local: it stops one machine from running a name twice, not two machines sharing a store.

`folder(location)` gives a local folder or a store's the same few whole-file operations, for what reads and
writes files by name (`teacher.cache`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from pyarrow import fs

from ray_kd.checkpoint import atomic_write
from ray_kd.config import shown_uri, uri_scheme
from ray_kd.errors import UserError, causes, first_line


class StorageError(UserError, RuntimeError):
    """The object store behind output_dir cannot be opened, read or written."""


class LocalFolder:
    """A local folder with RemoteFolder's whole-file operations: a file is written through a temporary name and a
    rename, so a reader never sees half of it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.shown = str(self.root)

    def show(self, rel: str) -> str:
        return str(self.root / rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write(self.root / rel, lambda tmp: tmp.write_bytes(data))

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None when there is no such file."""
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)


class RemoteFolder:
    """One folder of an object store: `uri` (credentials and options included) and `sub` below it."""

    def __init__(self, uri: str, sub: str = ""):
        self.shown = shown_uri(uri).rstrip("/") + (f"/{sub}" if sub else "")
        try:
            self.fs, base = fs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as err:
            raise StorageError(f"{shown_uri(uri)} cannot be opened ({first_line(err)}); check the URI, its "
                               "credentials and that the store is reachable") from None
        self.base = f"{base.rstrip('/')}/{sub}" if sub else base.rstrip("/")

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def sub(self, rel: str) -> "RemoteFolder":
        """The folder `rel` below this one, on the same opened filesystem."""
        child = object.__new__(RemoteFolder)
        child.fs, child.base, child.shown = self.fs, self.path(rel), self.show(rel)
        return child

    def show(self, rel: str) -> str:
        return f"{self.shown}/{rel}"

    def read_bytes(self, rel: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as src:
                return src.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self.path(rel)) as out:  # an object appears whole when the stream closes
            out.write(data)

    def download(self, rel: str, local: Path) -> None:
        """Copy one file to `local` through a temporary name, so a local file is always whole."""
        def copy(tmp: Path) -> None:
            with self.fs.open_input_stream(self.path(rel)) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)

        atomic_write(local, copy)

    def files(self, rel: str = "", recursive: bool = False) -> dict[str, tuple[int, float]]:
        """{path relative to `rel`: (size, mtime)} of the files under `rel` ({} when it does not exist)."""
        root = self.path(rel)
        infos = self.fs.get_file_info(fs.FileSelector(root, allow_not_found=True, recursive=recursive))
        return {i.path[len(root) + 1:]: (i.size, i.mtime.timestamp() if i.mtime else 0.0)
                for i in infos if i.type == fs.FileType.File}

    def folders(self, rel: str = "") -> list[str]:
        infos = self.fs.get_file_info(fs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == fs.FileType.Directory)

    def delete(self, rel: str) -> None:
        if self.fs.get_file_info(self.path(rel)).type == fs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def delete_folder(self, rel: str) -> None:
        if self.fs.get_file_info(self.path(rel)).type == fs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))


def folder(location: str, sub: str = "") -> LocalFolder | RemoteFolder:
    """`sub` under `location`: a local path or file:// URI's folder (as `local_storage_path` resolved it), or an
    object store's."""
    if uri_scheme(location) in (None, "file"):
        return LocalFolder(Path(location) / sub)
    return RemoteFolder(location, sub)


def check_writable(location: str, field: str) -> None:
    """The preflight's check of a store: write and delete one object there; one line naming `field` if that fails."""
    store = folder(location)
    try:
        store.write_bytes(".ray-kd-write-test", b"")
        store.delete(".ray-kd-write-test")
    except OSError as err:
        raise StorageError(f"{field}={store.shown} cannot be written ({first_line(err)}); check the bucket, its "
                           "credentials (the store's usual environment variables or the URI) and its "
                           "permissions") from None


NOT_ANSWERING = re.compile(r"AWS Error NETWORK_CONNECTION during \w+ operation: [^;]*")
"""What pyarrow's S3 client says when the store does not answer (refused, reset, timed out, no such host)."""


def store_down(err: BaseException, location: str, run_id: str, state: str) -> StorageError | None:
    """The one line for a run stopped by its object store (`location`, output_dir) not answering: the store and its
    endpoint (without credentials), the MLflow run's state, the resume; None for any other error. Found by the
    client's text anywhere in the chain, since a Ray worker's error reaches the driver as text."""
    if uri_scheme(location) in (None, "file"):
        return None
    said = next((m.group(0) for e in causes(err) if (m := NOT_ANSWERING.search(str(e)))), None)
    if said is None:
        return None
    endpoint = parse_qs(urlsplit(location).query).get("endpoint_override", [None])[0]
    at = f" at {shown_uri(endpoint)}" if endpoint else ""
    return StorageError(f"the object store {shown_uri(location)}{at} stopped answering ({said}); MLflow run "
                        f"{run_id} is {state}, the checkpoints it published are kept there: the same command "
                        "resumes once the store answers")
