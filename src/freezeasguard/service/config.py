"""The publisher's service configuration: one dataclass shared by `serve`, `worker`, the API and the tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..configs import strict_from_dict
from ..errors import FreezeAsGuardError

METHODS = ("full", "lora")
CONFIG_NAME = "service.json"


class ServiceStartError(FreezeAsGuardError, ValueError):
    """`serve` or `worker` refuses to start: what it was given could not run a single job."""


@dataclass
class ServiceConfig:
    """What the publisher fixes: the released model and guard, where jobs live, and the limits users get.

    Users choose only the hyperparameters (method, steps, batch size, learning rate, LoRA rank, seed), each
    within the limits below; the model, the guard and the LoRA targets are the publisher's.
    """

    model: str = "embedded"  # a shipped base ('embedded', 'embedded-style') or a Stable-Diffusion-format directory
    guard: str = ""  # the guard JSON every job runs under (required)
    data_dir: str = "service-data"  # uploads, job folders, artefacts, the SQLite database
    database: str = ""  # any SQLAlchemy URL; empty: SQLite (WAL) at <data_dir>/service.db
    # ---- upload limits
    max_upload_bytes: int = 64 << 20
    max_uncompressed_bytes: int = 256 << 20
    max_compression_ratio: float = 100.0  # per archive member (above 64 KiB) and for the whole archive
    max_files: int = 5000
    max_image_pixels: int = 4096 * 4096
    # all images of one upload together: bounds the CPU one upload can cost the API (decoding is checked
    # before a job is queued); 300 images of 1024 x 1024
    max_total_pixels: int = 300 * 1024 * 1024
    # ---- hyperparameter limits and defaults
    methods: tuple[str, ...] = METHODS
    max_steps: int = 2000
    max_batch_size: int = 16
    min_learning_rate: float = 1e-7
    max_learning_rate: float = 1e-2
    max_lora_rank: int = 64
    default_method: str = "lora"
    default_steps: int = 200
    default_batch_size: int = 4
    default_learning_rate: float = 1e-4
    default_lora_rank: int = 4
    # ---- per-key quotas (a key may carry its own)
    max_concurrent_jobs: int = 2
    max_steps_per_day: int = 20000
    # ---- workers
    checkpoint_every: int = 50  # steps between checkpoints: what a killed worker's successor resumes from
    lease_seconds: float = 60.0  # a job whose worker has not renewed its lease this long is claimable again
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 1.0
    sample_images: int = 4  # sample grid of the fine-tuned model: first N captions of the upload
    sample_steps: int = 20
    # processes (GPUs) per job: above 1 the worker launches the job under torchrun, one process per device;
    # a job's batch_size stays its global batch, split over the most processes (up to this) that divide it
    processes_per_job: int = 1
    devices: str = ""  # CUDA_VISIBLE_DEVICES for a worker's launched jobs (e.g. '0,1'); empty: inherit
    max_job_seconds: float = 86400.0  # running time after which a job fails with 'timeout' (0: no limit)
    # ---- retention: uploads, runs and artefacts of jobs finished this many days ago are deleted (0: keep)
    retention_days: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes shown by GET /v1/models

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"ServiceConfig.methods must be a non-empty subset of {METHODS}, got {list(self.methods)}")
        if self.default_method not in self.methods:
            raise ValueError(f"ServiceConfig.default_method {self.default_method!r} is not in methods {list(self.methods)}")
        for name in ("max_upload_bytes", "max_uncompressed_bytes", "max_files", "max_image_pixels", "max_total_pixels",
                     "max_steps",
                     "max_batch_size", "max_lora_rank", "max_concurrent_jobs", "max_steps_per_day", "sample_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ServiceConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.min_learning_rate <= self.max_learning_rate:
            raise ValueError("ServiceConfig needs 0 < min_learning_rate <= max_learning_rate, got "
                             f"{self.min_learning_rate}, {self.max_learning_rate}")
        # A default outside its own limits would give users jobs they could not have asked for.
        for name, lo, hi in (("default_steps", 1, self.max_steps), ("default_batch_size", 1, self.max_batch_size),
                             ("default_learning_rate", self.min_learning_rate, self.max_learning_rate),
                             ("default_lora_rank", 1, self.max_lora_rank)):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"ServiceConfig.{name} {getattr(self, name)} is outside its limits [{lo}, {hi}]")
        if self.heartbeat_seconds <= 0 or self.lease_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError("ServiceConfig.lease_seconds must exceed twice heartbeat_seconds (> 0), "
                             f"got lease {self.lease_seconds}, heartbeat {self.heartbeat_seconds}")
        if self.checkpoint_every < 0 or self.sample_images < 0:
            raise ValueError("ServiceConfig.checkpoint_every and sample_images must be >= 0")
        if int(self.processes_per_job) < 1:
            raise ValueError(f"ServiceConfig.processes_per_job must be >= 1, got {self.processes_per_job}")
        for name in ("max_job_seconds", "retention_days"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"ServiceConfig.{name} must be >= 0 (0: no limit), got {getattr(self, name)}")

    @property
    def root(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.root / 'service.db'}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = list(self.methods)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServiceConfig:
        return strict_from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> ServiceConfig:
        from ..utils.files import read_json

        p = Path(path)
        data = read_json(p, "service config")
        if not isinstance(data, dict):
            raise ValueError(f"{p}: a service config is a JSON object")
        return cls.from_dict(data)


def resolve_config(config: str | Path | None = None, **overrides: Any) -> ServiceConfig:
    """A config from a JSON file (or `<data_dir>/service.json` written by `serve`), then explicit overrides.

    Overrides that are None are ignored, so CLI options left unset keep the file's values.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    base: dict[str, Any] = {}
    if config is not None:
        base = ServiceConfig.load(config).to_dict()
    elif "data_dir" in given and (Path(given["data_dir"]) / CONFIG_NAME).is_file():
        base = ServiceConfig.load(Path(given["data_dir"]) / CONFIG_NAME).to_dict()
    base.update(given)
    cfg = ServiceConfig.from_dict(base)
    if not cfg.guard:
        raise ValueError("the service needs the publisher's guard: pass --guard (or set 'guard' in the config)")
    return cfg


def job_dir(cfg: ServiceConfig, job_id: str) -> Path:
    """Where a job's files live (its uploads, run and artefacts)."""
    return cfg.root / "jobs" / job_id
