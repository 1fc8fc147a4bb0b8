"""The service for real: a uvicorn server and worker processes on localhost. A worker is killed with SIGKILL
mid-job; another resumes the job from its last checkpoint; the verified result keeps the frozen tensors; a
restarted server still has the job and its artefacts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest

pytest.importorskip("fastapi")

from service_helpers import dataset_members, free_port, guarded_model, process_env, serve, start_cli, stop  # noqa: E402,F401,I001


def test_killed_worker_job_resumes_on_another_and_passes_verify(guarded_model, tmp_path):
    from freezeasguard.audit import verify
    from freezeasguard.guard import Guard, unet_tensors
    from freezeasguard.model import DiffusionModel
    from freezeasguard.service.client import Client
    from freezeasguard.service.config import ServiceConfig
    from freezeasguard.service.db import create_key, make_engine, session_factory

    model_dir, guard_path = guarded_model
    cfg = ServiceConfig(model=str(model_dir), guard=str(guard_path), data_dir=str(tmp_path / "svc"),
                        checkpoint_every=2, lease_seconds=2.0, heartbeat_seconds=0.25, poll_seconds=0.2,
                        sample_images=1, sample_steps=2)
    config = tmp_path / "service.json"
    config.write_text(json.dumps(cfg.to_dict()))
    cfg.root.mkdir(parents=True)
    with session_factory(make_engine(cfg.database_url))() as s:
        _, secret = create_key(s, "integration")
    data = tmp_path / "mine"
    data.mkdir()
    for name, blob in dataset_members().items():
        (data / name).write_bytes(blob)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve(config, port, tmp_path / "server.log")
    procs = [server]
    try:
        worker_a = start_cli(["worker", "--data-dir", str(cfg.root)], tmp_path / "worker-a.log")
        procs.append(worker_a)
        cli_env = process_env(FREEZEASGUARD_URL=url, FREEZEASGUARD_API_KEY=secret)
        sub = subprocess.run([sys.executable, "-m", "freezeasguard", "jobs", "submit", str(data), "--method", "full",
                              "--steps", "24", "--batch-size", "2", "--lr", "1e-3"],
                             env=cli_env, capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0, sub.stderr
        job_id = sub.stdout.strip()
        client = Client(url, secret, timeout=10)
        hp = client.status(job_id)["hyperparameters"]  # options given are sent; the others are the publisher's
        assert hp == {"method": "full", "steps": 24, "batch_size": 2, "learning_rate": 1e-3,
                      "lora_rank": cfg.default_lora_rank, "seed": 0}

        deadline = time.monotonic() + 90
        while True:  # the API answers while the worker trains
            job = client.status(job_id)
            if job["status"] == "running" and job["step"] >= 4:
                break
            assert job["status"] in ("queued", "running"), job
            assert time.monotonic() < deadline, (tmp_path / "worker-a.log").read_text()
            time.sleep(0.1)
        os.kill(worker_a.pid, signal.SIGKILL)
        worker_a.wait()
        assert job["step"] < 24, "the job finished before the worker could be killed"
        assert client.status(job_id)["status"] == "running"  # nobody knows yet; the lease will tell

        worker_b = start_cli(["worker", "--data-dir", str(cfg.root)], tmp_path / "worker-b.log")
        procs.append(worker_b)
        job = client.wait(job_id, poll=0.2, timeout=120)
        assert job["status"] == "succeeded", (job["error"], (tmp_path / "worker-b.log").read_text())
        assert job["attempts"] == 2 and job["step"] == 24
        assert job["result"]["savings"]["resumed_from_step"] >= 2
        messages = [e["message"] for e in client.events(job_id)]
        started = [m for m in messages if m.startswith("attempt ")]
        assert len(started) == 2 and started[0].split()[-1] != started[1].split()[-1], messages
        assert any(m.startswith("resuming from checkpoint step-") for m in messages), messages

        dl = subprocess.run([sys.executable, "-m", "freezeasguard", "jobs", "download", job_id, "--out",
                             str(tmp_path / "dl")], env=cli_env, capture_output=True, text=True, timeout=60)
        assert dl.returncode == 0, dl.stderr
        # a second download into the same folder replaces nothing without --overwrite, and says what it would
        (tmp_path / "dl" / "finetune.json").write_text("the user's own notes")
        again = subprocess.run([sys.executable, "-m", "freezeasguard", "jobs", "download", job_id, "--out",
                                str(tmp_path / "dl")], env=cli_env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and "finetune.json" in again.stderr, again.stderr
        assert (tmp_path / "dl" / "finetune.json").read_text() == "the user's own notes"
        with zipfile.ZipFile(tmp_path / "dl" / "model.zip") as zf:
            zf.extractall(tmp_path / "derivative")
        guard = Guard.load(guard_path)
        assert verify(tmp_path / "derivative", guard).compliant
        tuned = unet_tensors(DiffusionModel.from_pretrained(tmp_path / "derivative").unet)
        base = unet_tensors(DiffusionModel.from_pretrained(model_dir).unet)
        assert all(tuned[n].equal(base[n]) for n in guard.frozen)  # bit-identical, independently of verify
        assert any(not tuned[n].equal(base[n]) for n in base if n not in set(guard.frozen))

        # Restart the API: jobs and artefacts are still there.
        stop(server)
        port = free_port()
        server = serve(config, port, tmp_path / "server2.log")
        procs.append(server)
        with Client(f"http://127.0.0.1:{port}", secret) as again:
            assert again.status(job_id)["status"] == "succeeded"
            assert {a["name"] for a in again.artifacts(job_id)} >= {"model.zip", "finetune.json", "verify.json"}
    finally:
        for p in procs:
            stop(p)
