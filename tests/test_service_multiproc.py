"""Jobs trained by several processes: the worker launches `service.jobrun` under torchrun (gloo on CPU here,
one process per GPU on a publisher's machine). Progress, cancel, kill -9 and resumption hold as for one process,
and no launched process outlives its job or its worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from service_helpers import Api, guarded_model, service_config, wait_for  # noqa: E402,F401

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _ranks_of(folder: Path) -> list[int]:
    """Live processes (the torchrun agent and its ranks) training this job folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"freezeasguard.service.jobrun" in cmdline and str(folder).encode() in cmdline and state != "Z":
                found.append(int(entry.name))
    return found



def _status(api: Api, headers: dict[str, str], job_id: str) -> dict:
    return api.client.get(f"/v1/fine-tunes/{job_id}", headers=headers).json()


def test_two_process_job_survives_kill_9_of_its_worker_and_finishes_verified(service_config, guarded_model, tmp_path):
    from freezeasguard.audit import verify
    from freezeasguard.guard import Guard, unet_tensors
    from freezeasguard.model import DiffusionModel
    from freezeasguard.service.worker import Worker

    cfg = service_config(processes_per_job=2, lease_seconds=1.5, heartbeat_seconds=0.2)
    api = Api(cfg)
    headers = api.key()
    job_id = api.submit(headers, method="full", steps=30, batch_size=2, learning_rate=1e-3).json()["id"]
    config = tmp_path / "service.json"
    config.write_text(json.dumps(cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "freezeasguard", "worker", "--config", str(config)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    folder = cfg.root / "jobs" / job_id
    try:
        # Progress written by the launched rank 0 reaches the job row through the worker's heartbeat.
        job = wait_for(lambda: (j := _status(api, headers, job_id))["step"] >= 2 and j, 180,
                        f"step 2 ({(tmp_path / 'worker.log').read_text()[-2000:]})")
        assert job["status"] == "running" and job["step"] < 30, job
        assert len(_ranks_of(folder)) == 3  # torchrun and two ranks
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        # The ranks die with their worker: nothing keeps training the folder a successor will resume.
        # (Left running they would train on for seconds and finish the job unsupervised; 5 s is far longer
        # than the kernel and the ranks' watch need.)
        wait_for(lambda: not _ranks_of(folder), 5, "the launched processes to die with their worker")
        assert not (folder / "run" / "finetune.json").exists()
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()
        for pid in _ranks_of(folder):  # a failed check must not leave processes behind
            os.kill(pid, signal.SIGKILL)

    time.sleep(cfg.lease_seconds)  # the dead worker's lease runs out
    assert Worker(cfg, worker_id="second").run(exit_when_idle=True) == 1
    job = _status(api, headers, job_id)
    assert job["status"] == "succeeded", (job["error"], (folder / "train.log").read_text()[-3000:])
    assert job["attempts"] == 2 and job["step"] == 30 and job["result"]["processes"] == 2
    assert job["result"]["savings"]["resumed_from_step"] >= 2
    record = json.loads(api.client.get(f"/v1/fine-tunes/{job_id}/artifacts/finetune.json", headers=headers).content)
    assert record["metrics"]["world_size"] == 2 and record["metrics"]["global_batch"] == 2
    assert record["config"]["train"]["batch_size"] == 1  # the job's batch of 2, split over two processes
    r = api.client.get(f"/v1/fine-tunes/{job_id}/artifacts/model.zip", headers=headers)
    import io
    import zipfile

    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path / "derivative")
    guard = Guard.load(guarded_model[1])
    assert verify(tmp_path / "derivative", guard).compliant
    tuned = unet_tensors(DiffusionModel.from_pretrained(tmp_path / "derivative").unet)
    base = unet_tensors(DiffusionModel.from_pretrained(guarded_model[0]).unet)
    assert all(tuned[n].equal(base[n]) for n in guard.frozen)
    assert any(not tuned[n].equal(base[n]) for n in base if n not in set(guard.frozen))
    assert not _ranks_of(folder)


def test_sigterm_requeues_a_two_process_job_that_resumes_and_cancel_stops_every_process(service_config):
    """SIGTERM to the worker: the ranks checkpoint and stop, the job is requeued; the next worker resumes it
    from that checkpoint, and a cancel then stops it at a step boundary. Neither leaves a process behind."""
    from freezeasguard.service.worker import Worker

    api = Api(service_config(processes_per_job=2))
    headers = api.key()
    job_id = api.submit(headers, method="lora", steps=2000, batch_size=2).json()["id"]
    folder = api.cfg.root / "jobs" / job_id
    seen: dict[str, list[int]] = {}

    def act_at(step: int, action) -> threading.Thread:
        def watch() -> None:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if _status(api, headers, job_id)["step"] >= step:
                    seen.setdefault("ranks", []).extend(_ranks_of(folder))
                    action()
                    return
                time.sleep(0.05)

        t = threading.Thread(target=watch)
        t.start()
        return t

    # main thread: the worker's signal handling needs it
    t = act_at(2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    Worker(api.cfg, worker_id="first").run(exit_when_idle=True)
    t.join()
    job = _status(api, headers, job_id)
    assert job["status"] == "queued" and 2 <= job["step"] < 2000, (job, (folder / "train.log").read_text()[-3000:])
    assert not _ranks_of(folder)
    stopped_at = job["step"]

    t = act_at(stopped_at + 2, lambda: api.client.post(f"/v1/fine-tunes/{job_id}/cancel", headers=headers))
    Worker(api.cfg, worker_id="second").run(exit_when_idle=True)
    t.join()
    job = _status(api, headers, job_id)
    assert job["status"] == "cancelled", (job, (folder / "train.log").read_text()[-3000:])
    assert stopped_at + 2 <= job["step"] < 2000 and job["attempts"] == 2
    messages = [e["message"] for e in api.client.get(f"/v1/fine-tunes/{job_id}/events", headers=headers).json()["data"]]
    resumed = [int(m.rsplit("-", 1)[1]) for m in messages if m.startswith("resuming from checkpoint step-")]
    assert resumed and resumed[0] >= stopped_at, messages  # the checkpoint SIGTERM made
    assert len(seen["ranks"]) == 6  # torchrun and two ranks, each attempt
    assert not _ranks_of(folder)
    assert all(not Path(f"/proc/{pid}").exists() or (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
                                                      .split()[0] == "Z") for pid in seen["ranks"])
    assert api.client.get(f"/v1/fine-tunes/{job_id}/artifacts", headers=headers).status_code == 409


def test_a_failing_two_process_job_reports_the_ranks_error_code(service_config, guarded_model, tiny_latent_dir,
                                                                tmp_path):
    """A rank's exception reaches the job as the same error code the in-process path gives (here the publisher's
    guard was replaced by another model's while the service ran: a service error), through the ranks' outcome
    files."""
    import shutil

    from freezeasguard.guard import Guard
    from freezeasguard.model import DiffusionModel
    from freezeasguard.service.worker import Worker

    guard = tmp_path / "guard.json"
    shutil.copy(guarded_model[1], guard)
    api = Api(service_config(guard=str(guard), processes_per_job=2))
    worker = Worker(api.cfg)
    headers = api.key()
    job_id = api.submit(headers, batch_size=2).json()["id"]
    Guard.random(DiffusionModel.from_pretrained(tiny_latent_dir).unet, 0.3, seed=0).save(guard)
    worker.run(exit_when_idle=True)
    job = _status(api, headers, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "service_error", job["error"]
    assert "guard" in job["error"]["message"]
    assert not _ranks_of(api.cfg.root / "jobs" / job_id)


def test_processes_split_the_jobs_batch_evenly():
    from freezeasguard.service.config import ServiceConfig
    from freezeasguard.service.jobrun import processes_for

    assert [processes_for(b, 2) for b in (1, 2, 3, 4)] == [1, 2, 1, 2]
    assert [processes_for(b, 4) for b in (4, 6, 7, 8, 9)] == [4, 3, 1, 4, 3]
    assert processes_for(5, 1) == 1
    with pytest.raises(ValueError, match="processes_per_job"):
        ServiceConfig(guard="g.json", processes_per_job=0)


def test_more_processes_than_gpus_is_refused_at_worker_start(service_config, monkeypatch):
    import torch

    from freezeasguard.service.worker import Worker

    service_config().root.mkdir(parents=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="processes_per_job 2 exceeds the 1 GPU"):
        Worker(service_config(processes_per_job=2))
    with pytest.raises(ValueError, match="devices '3'"):
        Worker(service_config(processes_per_job=2, devices="3"))
    Worker(service_config(processes_per_job=2, devices="2,3"))
    Worker(service_config(processes_per_job=1))


def test_kill_ends_a_launch_and_its_ranks_in_their_own_sessions():
    """The last resort for a launch that will not stop: its ranks run in sessions of their own (as torchrun
    starts them), and a launcher that ignores SIGTERM is killed with all of them."""
    from freezeasguard.service.worker import _kill, descendants

    launcher = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "[subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True) "
                "for _ in range(2)]; time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", launcher], start_new_session=True)
    ranks = wait_for(lambda: len(d := descendants(proc.pid)) == 2 and d, 30, "two ranks")

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    try:
        _kill(proc, grace=0.5)
        assert proc.returncode == -signal.SIGKILL
        wait_for(lambda: all(gone(p) for p in ranks), 10, "the ranks to die")
    finally:
        for pid in [proc.pid, *ranks]:  # they ignore SIGTERM (inherited): never leave them behind
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
