"""Shared pieces of the service tests: a tiny model with a guard, a service config, dataset zips, an API client,
and real `serve` / `worker` processes."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from conftest import CAPTIONS, toy_images


def png_bytes(side: int = 16, seed: int = 0, index: int = 0) -> bytes:
    buf = io.BytesIO()
    toy_images(index + 1, side, seed)[index].save(buf, format="PNG")
    return buf.getvalue()


def dataset_members(n: int = 4, side: int = 16, prefix: str = "") -> dict[str, bytes]:
    """An imagefolder: n PNGs and metadata.jsonl, as archive member -> bytes."""
    members = {f"{prefix}{i}.png": png_bytes(side, index=i) for i in range(n)}
    rows = [json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i % 4]}) for i in range(n)]
    members[f"{prefix}metadata.jsonl"] = "\n".join(rows).encode()
    return members


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buf.getvalue()


@pytest.fixture(scope="session")
def guarded_model(tiny_dir, tmp_path_factory):
    """(model dir, guard path): the tiny pixel model and a random guard freezing 30% of its UNet tensors."""
    from freezeasguard.guard import Guard
    from freezeasguard.model import DiffusionModel

    guard = Guard.random(DiffusionModel.from_pretrained(tiny_dir).unet, 0.3, seed=0)
    path = tmp_path_factory.mktemp("guard") / "guard.json"
    guard.save(path)
    return Path(tiny_dir), path


@pytest.fixture
def service_config(guarded_model, tmp_path):
    """Factory: a ServiceConfig on the tiny model with short leases and few sampling steps."""
    from freezeasguard.service.config import ServiceConfig

    model, guard = guarded_model

    def make(**overrides: Any) -> ServiceConfig:
        settings: dict[str, Any] = dict(model=str(model), guard=str(guard), data_dir=str(tmp_path / "service"),
                                        checkpoint_every=2, lease_seconds=2.0, heartbeat_seconds=0.2,
                                        poll_seconds=0.1, sample_images=2, sample_steps=2, default_steps=4,
                                        default_batch_size=2)
        settings.update(overrides)
        return ServiceConfig(**settings)

    return make


class Api:
    """A TestClient on the app plus key helpers."""

    def __init__(self, cfg: Any) -> None:
        from fastapi.testclient import TestClient

        from freezeasguard.service.api import create_app

        self.cfg = cfg
        self.app = create_app(cfg)
        self.client = TestClient(self.app)

    def key(self, name: str = "alice", **quotas: Any) -> dict[str, str]:
        from freezeasguard.service.db import create_key

        with self.app.state.sessions() as s:
            _, secret = create_key(s, name, **quotas)
        return {"Authorization": f"Bearer {secret}"}

    def submit(self, headers: dict[str, str], archive: bytes | None = None, **fields: Any) -> Any:
        archive = make_zip(dataset_members()) if archive is None else archive
        return self.client.post("/v1/fine-tunes", headers=headers, data={k: str(v) for k, v in fields.items()},
                                files={"file": ("data.zip", archive, "application/zip")})

    def jobs_in_db(self) -> int:
        from sqlalchemy import func, select

        from freezeasguard.service.db import Job

        with self.app.state.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Job)))

    def job_folders(self) -> list[str]:
        root = self.cfg.root / "jobs"
        return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture
def api(service_config):
    return Api(service_config())


# ---------------------------------------------------------------------------- real processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m freezeasguard ARGS` in the background, its output to `log`."""
    return subprocess.Popen([sys.executable, "-m", "freezeasguard", *args], env=process_env(), stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def serve(config: Path, port: int, log: Path) -> subprocess.Popen:
    """A real `freezeasguard serve` (uvicorn) on localhost, returned once it answers /healthz."""
    import httpx

    proc = start_cli(["serve", "--config", str(config), "--port", str(port), "--log-level", "warning"], log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"server did not come up: {log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.02) -> Any:
    """predicate()'s first truthy value, polled until `timeout` seconds have passed (then an AssertionError
    naming `what`)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
