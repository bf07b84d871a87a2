"""Run specs: YAML files plus `key=value` overrides, validated by pydantic.

Every field has a default that runs on the digits on this machine; a bad field
fails with one line naming it (see `ConfigError`).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ray_kd.errors import UserError
from ray_kd.methods import method_class
from ray_kd.validation import Strict, one_line
from ray_kd.yaml_files import YamlError, load_yaml_file, yaml_problem


class ConfigError(UserError, ValueError):
    """A run spec that cannot run; the message names the field and the fix."""


class SyntheticConfig(Strict):
    """LW-KD's synthesized digit-glyph classes (`data.dataset: synthetic`, drawn by `ray_kd.synthetic`)."""

    classes: int = Field(10, ge=1)
    size: int = Field(32, ge=4, description="image side in pixels (the target images' side)")
    per_class: int = Field(300, ge=1, description="training images per class; the test split gets a fifth")
    seed: int = 0


class DataConfig(Strict):
    dataset: str = Field("digits", description="the data source: digits, cifar10, cifar100, imagefolder, synthetic, "
                                                "a plugin's, or package.module:Class (`ray-kd datasets` lists them)")
    root: str | None = Field(None, description="dataset root, or a .tar.gz of an ImageFolder tree")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    download: bool = Field(False, description="let torchvision download CIFAR if the root lacks it")
    batch_size: int = Field(64, gt=0)
    augment: Literal["auto", "none", "crop_flip"] = "auto"
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of train held out for validation")
    train_subset: int | None = Field(None, gt=0, description="use only this many training images (stratified)")
    cache_dir: str = ".cache/ray_kd"
    bad_images: Literal["error", "skip"] = Field(
        "error", description="an ImageFolder file that does not decode: stop naming it, or skip it with a count")
    mode: Literal["memory", "stream"] = Field(
        "memory", description="memory: decode the whole set once into every worker; stream: read ImageFolder "
                              "images from disk batch by batch (any size of set, any image sizes)")
    workers: int = Field(2, ge=0, description="stream mode: DataLoader processes of each loader "
                         "(decode=once) or of each role's worker (decode=per_role)")
    image_size: int | None = Field(None, gt=0, description="stream mode: side of the square crop (default 224)")
    normalize: Literal["dataset", "imagenet"] | tuple[list[float], list[float]] = Field(
        "dataset", description="per-channel mean/std: of the training set, ImageNet's, or [mean...], [std...]")
    decode: Literal["once", "per_role"] = Field(
        "once", description="stream mode on Ray: once: a loader actor per replica decodes each step's images once "
                            "for all its roles (shared through Ray's object store); per_role: every role's worker "
                            "decodes them itself")
    prefetch: int = Field(4, ge=1, description="decode=once: steps a loader decodes ahead of its slowest role")
    loader_resources: dict[str, float] = Field(
        default_factory=dict, description="decode=once: Ray resources each loader actor needs (e.g. {CPU: 3, "
                                          "decode_node: 1}: it runs on a node that has them); {} runs it beside "
                                          "the replica's first role, taking none of the roles' CPUs")
    checksum: bool = Field(False, description="record a crc32 of every batch each role drew, as "
                                              "<role>/data_checksum (proves the roles saw the same pixels)")

    @field_validator("root", "cache_dir")
    @classmethod
    def _local_folder(cls, path: str | None, info) -> str | None:
        return None if path is None else local_storage_path(path, f"data.{info.field_name}")

    @field_validator("dataset")
    @classmethod
    def _known_source(cls, name: str) -> str:
        from ray_kd.data_sources import source_for

        source_for(name)
        return name

    @model_validator(mode="after")
    def _settings_fit_dataset(self) -> "DataConfig":
        from ray_kd.data_sources import source_for

        source_for(self.dataset).check(self)
        if self.mode == "memory" and self.image_size is not None:
            raise ValueError("data.image_size applies to data.mode=stream only (memory mode keeps the stored "
                             "size): remove it or set data.mode=stream")
        if not isinstance(self.normalize, str):
            mean, std = self.normalize
            if len(mean) != len(std) or min(std) <= 0:
                raise ValueError("data.normalize: give [mean...], [std...] of one value per channel, every std > 0")
        return self


class MethodConfig(BaseModel):
    """`name` picks the method; every other key is one of that method's params."""

    model_config = ConfigDict(extra="allow")
    name: str = "dml"

    def build(self):
        cls = method_class(self.name)
        return cls(cls.Params(**(self.model_extra or {})))


class RoleConfig(Strict):
    model: str = Field(description="a built-in name, torchvision:<name>, timm:<name> or package.module:factory")
    checkpoint: str | None = Field(None, description="weights: a `ray-kd train-teacher` file, or a state dict "
                                   "(.pth/.pt as torch.save writes it, or .safetensors)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of an external "
                                         "model's builder (e.g. width_mult for torchvision:mobilenet_v2)")
    stages: list[str] | None = Field(None, description="an external model's stage modules, by name in order "
                                     "(e.g. [layer1, layer2, layer3, layer4]); None finds them")
    replace_head: bool = Field(False, description="a checkpoint whose classifier has another class count gets "
                               "a fresh head instead of being refused")
    pretrained: bool = Field(False, description="start a torchvision: or timm: model from its library's pretrained "
                             "weights (torchvision: the model's DEFAULT weights; timm: the name's tag, e.g. "
                             "timm:resnet50.a1_in1k), read from the cache under TORCH_HOME / HF_HOME, downloaded "
                             "there if missing; data.normalize then defaults to their mean/std")

    @field_validator("checkpoint")
    @classmethod
    def _local_file(cls, path: str | None) -> str | None:
        return None if path is None else local_storage_path(path, "checkpoint")

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from ray_kd.models import list_models
        from ray_kd.models.external import check_name, is_external

        if is_external(name):
            check_name(name)
        elif name not in list_models():
            raise ValueError(f"unknown model {name!r}; `ray-kd models` lists them, or name torchvision:<name>, "
                             "timm:<name> or package.module:factory")
        return name

    @model_validator(mode="after")
    def _options_fit_model(self) -> "RoleConfig":
        from ray_kd.models.external import RESERVED_KWARGS, is_external

        if not is_external(self.model) and (self.model_kwargs or self.stages):
            raise ValueError(f"model_kwargs and stages are for torchvision:, timm: and factory models; "
                             f"{self.model!r} is built in: remove them")
        reserved = sorted(set(self.model_kwargs) & set(RESERVED_KWARGS))
        if reserved:
            raise ValueError(f"model_kwargs may not set {', '.join(reserved)}: ray-kd sets the class count and "
                             "channels from the data and loads weights itself (use pretrained: true or checkpoint)")
        if self.pretrained:
            if self.checkpoint is not None:
                raise ValueError("pretrained and checkpoint both give the weights: keep one (a checkpoint "
                                 "fine-tuned from the pretrained weights holds them already)")
            from ray_kd.hub_weights import hub_weights

            hub_weights(self.model)  # a library with no pretrained weights for the name: one line now
        return self

    @property
    def model_options(self) -> dict[str, Any]:
        """What `create_model` takes beside the name (see ray_kd.models.external)."""
        return {"model_kwargs": self.model_kwargs, "stages": self.stages}


class TeacherConfig(RoleConfig):
    ahead: int = Field(2, ge=0, description="on the Ray executor a frozen teacher computes this many batches ahead "
                       "of the students, so they never wait on its forward (0: lockstep); the numbers are the same")
    cache: str | None = Field(None, description="a folder (a path or file:// URI) or an object store (s3://bucket/"
                              "prefix, gs://, ...) keeping a frozen teacher's outputs per step: a later run, seed or "
                              "sweep trial with the same teacher, data and batches reads them instead of computing "
                              "them; the students train on the stored values")
    cache_dtype: Literal["float16", "float32"] = Field(
        "float16", description="what teacher.cache stores: float16 (half the bytes), or float32 (the numbers "
                               "of a run without the cache, exactly)")
    cache_topk: int | None = Field(None, gt=0, description="keep only each image's top-k teacher logits in "
                                   "teacher.cache; KD then distils the top-k distribution renormalised (method kd)")

    @field_validator("cache")
    @classmethod
    def _cache_location(cls, cache: str | None) -> str | None:
        return None if cache is None else local_storage_path(cache, "teacher.cache", remote_ok=True)

    @model_validator(mode="after")
    def _topk_needs_cache(self) -> "TeacherConfig":
        if self.cache_topk is not None and self.cache is None:
            raise ValueError("teacher.cache_topk keeps the top-k logits in teacher.cache: set teacher.cache too")
        return self


class OptimConfig(Strict):
    epochs: int = Field(15, gt=0)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    milestones: list[int] = Field(default_factory=lambda: [10], description="epochs at which lr *= gamma")
    gamma: float = Field(0.1, gt=0)
    steps_per_epoch: int | None = Field(None, gt=0, description="cap on steps per epoch (quick runs, tests)")
    # The training recipe (ray_kd/recipe.py); the defaults are the recipe every config before them ran.
    name: Literal["sgd", "adamw"] = Field("sgd", description="optimiser; adamw uses torch's betas and eps")
    no_decay_norm_bias: bool = Field(False, description="weight_decay 0 on norm and bias parameters (1-d ones)")
    schedule: Literal["multistep", "cosine"] = Field("multistep", description="lr schedule, stepped per iteration")
    warmup_epochs: float = Field(0.0, ge=0, description="linear lr warmup first (fractions of an epoch allowed)")
    warmup_start_factor: float = Field(0.01, gt=0, le=1, description="lr x this at the first warmup step")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="autocast dtype; fp16 adds a grad scaler (for GPUs; bf16 is the one for CPUs)")
    clip_grad_norm: float | None = Field(None, gt=0, description="clip each role's gradient norm to this")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="smoothing of every cross-entropy on labels")

    @model_validator(mode="after")
    def _warmup_fits(self) -> "OptimConfig":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"optim.warmup_epochs={self.warmup_epochs:g} must be below optim.epochs={self.epochs}")
        early = [m for m in self.milestones if m <= self.warmup_epochs]
        if self.schedule == "multistep" and self.warmup_epochs and early:
            raise ValueError(f"optim.milestones {self.milestones} must all come after optim.warmup_epochs="
                             f"{self.warmup_epochs:g}")
        return self


class EvalConfig(Strict):
    """When roles are scored: evaluation of every role on val and test each epoch can cost more than training."""

    every: int = Field(1, gt=0, description="evaluate every N epochs; the last epoch is always evaluated")
    splits: list[Literal["val", "test"]] = Field(
        default_factory=lambda: ["val", "test"], min_length=1,
        description="splits scored at the epochs before the last (the last scores val and test)")


class RuntimeConfig(Strict):
    executor: Literal["ray", "local"] = "ray"
    address: str | None = Field(None, description="Ray cluster address; None starts a local one")
    cpus_per_worker: float = Field(0.5, gt=0)
    threads_per_worker: int = Field(1, gt=0)
    channels_last: bool = Field(True, description="image batches and conv weights in NHWC, the layout CPUs' "
                                "oneDNN and GPUs' tensor cores are fastest in (benchmarks/channels_last.py)")
    fold_frozen_batchnorm: bool = Field(True, description="a frozen teacher's BatchNorm folded into the convs "
                                        "before it: one pass fewer, the same outputs to float rounding "
                                        "(benchmarks/fold_batchnorm.py)")
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    worker_logs: bool = Field(False, description="stream Ray worker logs to the console")
    progress_every_s: float = Field(30.0, gt=0, description="within an epoch: a progress line this often "
                                    "when the console is not a terminal (a terminal gets a bar)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoint folders kept per run (the newest ones)")
    replicas: int = Field(1, ge=1, description="data-parallel replicas of every role: each step's batch is split "
                          "into this many shards and each role's gradients are averaged across its replicas")
    placement: Literal["apart", "together"] = Field("apart", description="apart: one worker per role per replica "
                                                    "(a device each); together: one worker per replica runs all its "
                                                    "roles (a device per replica)")
    sync_bn: bool = Field(False, description="with replicas: BatchNorm over the global batch (as one process), "
                          "not each shard's; costs collectives per BatchNorm layer")

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _yaml_boolean(cls, value: Any) -> Any:
        """YAML reads an unquoted yes/no (and true/false) as a boolean."""
        return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _replicas_need_ray(self) -> "RuntimeConfig":
        if self.replicas > 1 and self.executor != "ray":
            raise ValueError(f"runtime.replicas={self.replicas} needs runtime.executor=ray (the single-process "
                             "executor runs one replica)")
        return self


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins, else sqlite:///mlflow.db")
    experiment: str = "ray-kd"
    log_every_steps: int = Field(50, ge=0, description="step-level loss terms and lr to MLflow this often; 0: off")
    register_model: str | None = Field(None, description="register the best student under this name in the model registry")
    register_alias: str = Field("candidate", description="the registry alias set on the newly registered version "
                                "(letters, digits, _ and -; not 'latest' or v<N>)")
    system_metrics_interval: float = Field(10.0, ge=0, description="seconds between CPU/memory/GPU samples of "
                                           "each worker, logged to the run; 0 turns them off")

    @field_validator("register_model")
    @classmethod
    def _model_name(cls, name: str | None) -> str | None:
        """MLflow's own rule for a registered model's name, checked before the run trains rather than after."""
        if name is not None:
            from mlflow.exceptions import MlflowException
            from mlflow.utils.validation import _validate_model_name

            try:
                _validate_model_name(name)
            except MlflowException as err:
                raise ValueError(err.message.splitlines()[0]) from None
        return name

    @field_validator("register_alias")
    @classmethod
    def _registry_alias(cls, alias: str) -> str:
        if not re.fullmatch(r"[\w-]{1,255}", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
            raise ValueError(f"tracking.register_alias={alias!r}: an alias is 1-255 letters, digits, _ or -, and "
                             "not 'latest' or v<number> (MLflow reserves them)")
        return alias


URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):(//)?")
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
"""The remote schemes pyarrow.fs opens (Ray's storage_path goes through the same layer)."""


def uri_scheme(path: str) -> str | None:
    """The lower-case scheme of a `scheme://...` URI; None for a plain path (`C:` or `a:b` included)."""
    match = URI_SCHEME.match(path)
    return match.group(1).lower() if match and (match.group(2) or match.group(1).lower() == "file") else None


def local_storage_path(path: str, field: str = "output_dir", remote_ok: bool = False) -> str:
    """`path` as every process of a run uses it: a file:// URI resolved by pyarrow.fs to its local path, a plain
    path kept as it is, and (where `remote_ok`) an object-store URI kept whole (`ray_kd.storage` mirrors it).
    Any other scheme is refused in one line. Opening a remote store is left to the preflight: resolving an S3
    bucket's region is a network call."""
    scheme = uri_scheme(path)
    if scheme is None:
        return path  # a path (a relative one is resolved by with_absolute_paths)
    if scheme != "file":
        if remote_ok and scheme in OBJECT_STORE_SCHEMES:
            if scheme in ("s3", "gs", "gcs") and not urlsplit(path).hostname:
                raise ValueError(f"{shown_uri(path)} names no bucket: write {field}={scheme}://bucket/prefix")
            return path
        accepted = ("a local path, a file:// URI or an object store ("
                    + ", ".join(f"{s}://" for s in OBJECT_STORE_SCHEMES) + ")")
        raise ValueError(f"{scheme}:// is not supported ({shown_uri(path)}): {field} is "
                         + (accepted if remote_ok else "a local path or a file:// URI, on a cluster a folder every "
                            "node mounts (NFS, a shared disk)"))
    from pyarrow import ArrowInvalid
    from pyarrow.fs import FileSystem

    try:
        _, local = FileSystem.from_uri(path)
    except ArrowInvalid as err:
        raise ValueError(f"{path!r} is not a local file URI ({err}); write file:///absolute/path") from None
    return local


def storage_mirror(uri: str) -> Path:
    """The local folder that mirrors an object-store URI on this machine: `$RAY_KD_STORAGE_CACHE` (default
    ~/.cache/ray-kd/storage) / scheme / bucket / path; credentials and options in the URI are not part of it."""
    parts = urlsplit(uri)
    root = Path(os.environ.get("RAY_KD_STORAGE_CACHE", "~/.cache/ray-kd/storage")).expanduser()
    return root.resolve() / parts.scheme.lower() / (parts.hostname or "_") / parts.path.strip("/")


def run_folder_path(output_dir: str, name: str) -> Path:
    """Run `name`'s folder on this machine: under output_dir, or the local mirror of an object store's."""
    base = storage_mirror(output_dir) if uri_scheme(output_dir) is not None else Path(output_dir).resolve()
    return base / name


def shown_uri(uri: str) -> str:
    """`uri` as every output shows it (a message, an MLflow param, tag or text, a file of the run folder): without
    the credentials, query options and fragment a URI may carry (`s3://KEY:SECRET@bucket/p?secret_key=...` ->
    `s3://bucket/p`). A plain path or a file: URI (no credentials there) is kept whole. The one place a URI is made fit to show: `shown_config` passes
    every string of a config through it, so a URI-valued field added later is covered too."""
    if uri_scheme(uri) in (None, "file"):
        return uri
    parts = urlsplit(uri)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: nothing of it is shown
        port = ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def shown_config(cfg: "RunConfig") -> dict:
    """The config as it is printed, logged to MLflow and written to the run folder: every string through
    `shown_uri`."""
    def shown(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: shown(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [shown(v) for v in node]
        return shown_uri(node) if isinstance(node, str) else node

    return shown(cfg.model_dump())


MAX_NAME = 200
"""Of a run's name: a folder name holds 255 bytes, and a sweep adds `-sweep`, its trials `-<trial id>`."""


class RunConfig(Strict):
    name: str = Field("digits-dml", pattern=r"^[A-Za-z0-9_.-]+$", description="one folder name under output_dir")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    output_dir: str = Field("runs", description="where run folders go: a local path or a file:// URI (on a "
                            "cluster, storage every node sees: an NFS mount, a shared disk), or an object store "
                            "(s3://bucket/prefix, gs://, abfs://, hdfs://) mirrored locally")
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    teacher: TeacherConfig | None = None
    students: list[RoleConfig] = Field(default_factory=lambda: [RoleConfig(model="digits_cnn_s")] * 2, min_length=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    _name_given: bool = PrivateAttr(False)

    @property
    def name_given(self) -> bool:
        """Whether `name` was chosen by the caller (a `name=` override, or a dict or RunConfig that set it) rather
        than taken from a config file or the default: a run whose name was not chosen may take a new folder
        (`ray_kd.run._free_name`)."""
        return self._name_given

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        if name in (".", ".."):
            raise ValueError(f"name {name!r} is not a folder of its own; use letters, digits, '_', '-', '.'")
        if len(name) > MAX_NAME:
            raise ValueError(f"name is {len(name)} characters long; keep it to {MAX_NAME} (a folder name, with room "
                             "for a sweep's -sweep and trial suffixes)")
        return name

    @field_validator("output_dir")
    @classmethod
    def _local_storage(cls, output_dir: str) -> str:
        return local_storage_path(output_dir, remote_ok=True)

    @model_validator(mode="after")
    def _method_fits_roles(self) -> "RunConfig":
        cls = method_class(self.method.name)
        try:
            params = cls.Params(**(self.method.model_extra or {}))
        except ValidationError as err:
            raise ValueError(one_line(err, prefix="method.")) from None
        self.method = MethodConfig(name=self.method.name, **params.model_dump())
        if cls.needs_teacher and self.teacher is None:
            raise ValueError(f"method {cls.name!r} needs a teacher: set teacher.model and teacher.checkpoint")
        if cls.needs_teacher and self.teacher.checkpoint is None and not self.teacher.pretrained:
            raise ValueError(f"method {cls.name!r} needs a trained teacher: set teacher.checkpoint (from `ray-kd "
                             "train-teacher`) or teacher.pretrained=true")
        if not cls.needs_teacher and self.teacher is not None:
            raise ValueError(f"method {cls.name!r} takes no teacher: remove the teacher section")
        if len(self.students) < cls.min_students:
            raise ValueError(f"method {cls.name!r} needs at least {cls.min_students} students, got {len(self.students)}")
        if self.teacher is not None and self.teacher.cache_topk is not None and cls.name != "kd":
            raise ValueError(f"teacher.cache_topk is for method kd (its loss on the renormalised top-k); {cls.name!r} "
                             "reads the teacher's logits otherwise: remove teacher.cache_topk")
        if self.data.batch_size < self.runtime.replicas:
            raise ValueError(f"data.batch_size={self.data.batch_size} cannot be split into runtime.replicas="
                             f"{self.runtime.replicas} shards; raise the batch size or lower the replicas")
        return self

    @model_validator(mode="after")
    def _normalize_as_pretrained(self) -> "RunConfig":
        """Unless data.normalize is set, images are normalised as the first pretrained role's weights were
        trained (the teacher's before the students'); gray images keep their own (the weights' are per RGB)."""
        from ray_kd.data_sources import source_for

        pretrained = [r for r in ([self.teacher] if self.teacher else []) + self.students if r.pretrained]
        if pretrained and "normalize" not in self.data.model_fields_set and not source_for(self.data.dataset).gray:
            from ray_kd.hub_weights import hub_weights

            weights = hub_weights(pretrained[0].model)
            self.data.normalize = (list(weights.mean), list(weights.std))
        return self

    def with_absolute_paths(self) -> "RunConfig":
        """The same spec with its file paths resolved against this process's working directory.

        `load_config` applies it, so a relative path means the same file wherever it is read later: in a
        Ray worker (another working directory), in a Tune trial (a directory of its own), or on resume."""
        def absolute(path: str | None) -> str | None:
            return None if path is None else str(Path(path).resolve())

        roles = {"teacher": None if self.teacher is None else
                 self.teacher.model_copy(update={"checkpoint": absolute(self.teacher.checkpoint),
                                                 "cache": self.teacher.cache if uri_scheme(self.teacher.cache or "")
                                                 else absolute(self.teacher.cache)}),
                 "students": [s.model_copy(update={"checkpoint": absolute(s.checkpoint)}) for s in self.students]}
        return self.model_copy(update={
            "output_dir": self.output_dir if uri_scheme(self.output_dir) else absolute(self.output_dir), **roles,
            "data": self.data.model_copy(update={"root": absolute(self.data.root),
                                                 "cache_dir": absolute(self.data.cache_dir)})})


Overrides = list[str] | dict[str, Any]
"""`["optim.lr=0.1", "teacher=null"]` (values parse as YAML scalars) or `{"optim.lr": 0.1}` (typed values)."""


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree['students'][0]['model'] = value, for dotted = 'students.0.model'."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)]
            continue
        node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict, overrides: Overrides) -> dict:
    """Set each overridden field in `tree` (a config as a dict); a section it lacks starts from the defaults."""
    defaults = RunConfig().model_dump(exclude={"method"})
    items = overrides.items() if isinstance(overrides, dict) else (_parse_override(o) for o in overrides)
    for key, value in items:
        section = key.split(".")[0]
        if "." in key and section in defaults and section not in tree:
            # students.0.model=... edits the default students; a section of fields starts empty, so it records
            # only the fields set (whether data.normalize was set decides its default)
            tree[section] = {} if isinstance(defaults[section], dict) else defaults[section]
        try:
            set_dotted(tree, key, value)
        except (IndexError, ValueError) as err:
            raise ConfigError(f"override {key}={value!r}: {err}") from None
    return tree


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. optim.epochs=5)")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_problem(err)})") from None


def load_config(source: str | Path | dict | RunConfig | None = None, overrides: Overrides | None = None) -> RunConfig:
    """A validated run spec from a YAML file, a dict or a RunConfig (None: the defaults), overrides applied,
    relative paths resolved against the caller's working directory (see `RunConfig.with_absolute_paths`)."""
    if not isinstance(source, (str, Path, dict, RunConfig, type(None))):
        raise ConfigError(f"config must be a YAML path, a dict or a RunConfig, not {type(source).__name__} "
                          f"{source!r}")
    if not (overrides is None or isinstance(overrides, dict)
            or (isinstance(overrides, (list, tuple)) and all(isinstance(o, str) for o in overrides))):
        raise ConfigError(f"overrides must be a list of 'key=value' strings or a {{key: value}} dict, not "
                          f"{type(overrides).__name__} {overrides!r} (e.g. ['optim.epochs=2'])")
    if isinstance(source, RunConfig):
        tree, given = source.model_dump(), source.name_given
    elif isinstance(source, dict):
        tree, given = copy.deepcopy(source), "name" in source
    elif source is not None:
        tree, given = _read_yaml(Path(source)), False
    else:
        tree, given = {}, False
    cfg = validate_config(apply_overrides(tree, overrides or [])).with_absolute_paths()
    keys = overrides or {} if isinstance(overrides, dict) else [str(o).split("=", 1)[0].strip() for o in overrides or []]
    cfg._name_given = given or "name" in keys
    return cfg


def _read_yaml(path: Path) -> dict:
    try:
        tree = load_yaml_file(path, "config file") or {}
    except YamlError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (name, data, method, ...)")
    return tree


def validate_config(tree: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        head = "config error at " if err.errors()[0]["loc"] else "config error: "
        raise ConfigError(head + one_line(err)) from None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}: the form MLflow params and Tune spaces use."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                flat.update(flatten(item, f"{name}.{i}."))
        else:
            flat[name] = value
    return flat
