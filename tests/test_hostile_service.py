"""The fine-tuning service against crashes and hostile users, one test per principle:

- a crash at any point leaves no job unfinished: a real uvicorn server and real workers are killed with SIGKILL
  at each stage (upload, validation, queue, training, release); what they held is failed, cancelled, requeued
  or finished, a cut-short upload's files are removed, and no crashed submission keeps a slot of its key;
- cancel works in every unfinished state;
- revoking a key cancels its unfinished jobs, a running one at its next step;
- uploads are decoded only as the allowed formats, known by content, within a limit on their total pixels,
  and every bad one gets a 4xx JSON error naming the entry;
- nothing a user receives names a path on the server;
- one hyperparameter model, built from the ServiceConfig, gives the bounds, the defaults and the OpenAPI schema;
- `serve` and `worker` refuse to start with a guard that does not fit the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from service_helpers import (  # noqa: E402,F401
    Api,
    dataset_members,
    free_port,
    guarded_model,
    make_zip,
    png_bytes,
    process_env,
    serve,
    service_config,
    start_cli,
    stop,
    wait_for,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs fcntl locks and SIGKILL")


# ---------------------------------------------------------------------------- helpers

def _slow_to_check_zip(n: int = 200) -> bytes:
    """n captioned 1024 x 1024 images in a small zip (every member the same few kilobytes of PNG): within the
    default limits, and decoding them keeps the API checking the upload for a second or more."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1024, 1024), (200, 30, 30)).save(buf, format="PNG")
    members = {f"{i}.png": buf.getvalue() for i in range(n)}
    members["metadata.jsonl"] = "\n".join(json.dumps({"file_name": f"{i}.png", "text": "a red square"})
                                          for i in range(n)).encode()
    return make_zip(members, zipfile.ZIP_STORED)


def _being_checked(cfg: Any, known: set[str] = frozenset()) -> str:
    """The id of a job whose upload the API has started extracting (its row is validating_files by then)."""
    root = cfg.root / "jobs"
    return wait_for(lambda: next((p.name for p in root.glob("ftjob-*") if p.name not in known
                                   and (p / "data").is_dir()), None), 120, "an upload being checked")


def _post_in_background(url: str, secret: str, archive: bytes) -> threading.Thread:
    """POST a dataset from a thread; the server may die under it (the thread then just ends)."""
    import httpx

    def post() -> None:
        try:
            httpx.post(f"{url}/v1/fine-tunes", headers={"Authorization": f"Bearer {secret}"},
                       files={"file": ("data.zip", archive, "application/zip")}, timeout=120)
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=post)
    t.start()
    return t


def _half_sent_upload(port: int, secret: str, archive: bytes) -> socket.socket:
    """A multipart upload whose first half only has been sent: the server is still receiving it."""
    boundary = "hostile-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="data.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n").encode() + archive + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/fine-tunes HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {secret}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head + body[: len(body) // 2])
    return sock


def _rows(cfg: Any) -> dict[str, Any]:
    """Every job row (id -> row), read from the database as the processes left it."""
    from sqlalchemy import select

    from freezeasguard.service.db import Job, make_engine, session_factory

    engine = make_engine(cfg.database_url)
    try:
        with session_factory(engine)() as s:
            return {j.id: j for j in s.scalars(select(Job)).all()}
    finally:
        engine.dispose()


def _folders(cfg: Any) -> set[str]:
    root = cfg.root / "jobs"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def _real_config(tmp_path: Path, guarded_model: Any, **overrides: Any) -> tuple[Any, Path, str]:
    """(config, its JSON file, an API key) of a service for real processes. The lease is far longer than any
    wait below: a job a dead worker held moves on only through recovery, never through its lease running out."""
    from freezeasguard.service.config import ServiceConfig
    from freezeasguard.service.db import create_key, make_engine, session_factory

    model, guard = guarded_model
    settings: dict[str, Any] = dict(model=str(model), guard=str(guard), data_dir=str(tmp_path / "svc"),
                                    checkpoint_every=2, lease_seconds=300.0, heartbeat_seconds=0.25, poll_seconds=0.2,
                                    sample_images=2, sample_steps=2, default_steps=4, default_batch_size=2,
                                    max_concurrent_jobs=2)
    settings.update(overrides)
    cfg = ServiceConfig(**settings)
    config = tmp_path / "service.json"
    config.write_text(json.dumps(cfg.to_dict()))
    cfg.root.mkdir(parents=True)
    engine = make_engine(cfg.database_url)
    with session_factory(engine)() as s:
        _, secret = create_key(s, "hostile")
    engine.dispose()
    return cfg, config, secret


# ---------------------------------------------------------------------------- crashes
def test_a_server_killed_at_upload_validation_or_queue_leaves_no_job_unfinished(guarded_model, tmp_path,
                                                                               record_property):
    import httpx

    record_property("expected", "after SIGKILL at upload, validation and queue: no job unfinished, no orphan "
                                "files, the queued job runs")
    from freezeasguard.service.worker import Worker

    cfg, config, secret = _real_config(tmp_path, guarded_model)
    auth = {"Authorization": f"Bearer {secret}"}
    replica = Api(cfg)  # a second API process on the same folder and database, alive throughout
    port = free_port()
    server = serve(config, port, tmp_path / "server-1.log")
    procs = [server]
    try:
        # Upload and validation: one SIGKILL while one request is still sending its body and another's upload
        # is being checked.
        half = _half_sent_upload(port, secret, make_zip(dataset_members()))
        poster = _post_in_background(f"http://127.0.0.1:{port}", secret, _slow_to_check_zip())
        first = _being_checked(cfg)
        server.kill()
        server.wait()
        half.close()
        poster.join()
        assert _rows(cfg)[first].status == "validating_files"  # what the crash left

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = serve(config, port, tmp_path / "server-2.log")  # every start recovers, whatever the job's age
        procs.append(server)
        jobs = httpx.get(f"{url}/v1/fine-tunes", headers=auth).json()["data"]
        assert [(j["id"], j["status"], (j["error"] or {}).get("code")) for j in jobs] == \
            [(first, "failed", "upload_interrupted")]
        assert _folders(cfg) == set(), "the half-sent upload or the half-checked one left files"

        # Queue: a queued job outlives the server; a job whose check died is cancelled at once by a live replica.
        queued = httpx.post(f"{url}/v1/fine-tunes", headers=auth,
                            files={"file": ("data.zip", make_zip(dataset_members()), "application/zip")}).json()
        assert queued["status"] == "queued", queued
        poster = _post_in_background(url, secret, _slow_to_check_zip())
        second = _being_checked(cfg, {queued["id"]})
        server.kill()
        server.wait()
        poster.join()
        r = replica.client.post(f"/v1/fine-tunes/{second}/cancel", headers=auth)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        assert _folders(cfg) == {queued["id"]}
        # Two crashed submissions hold none of the key's two slots: only the queued job does.
        assert replica.client.get(f"/v1/fine-tunes/{queued['id']}", headers=auth).json()["status"] == "queued"
        more = replica.submit(auth)
        assert more.status_code == 201, more.text
        assert {j.status for j in _rows(cfg).values()} == {"failed", "cancelled", "queued"}
    finally:
        for p in procs:
            stop(p)
    assert Worker(cfg).run(exit_when_idle=True) == 2
    statuses = sorted(j.status for j in _rows(cfg).values())
    record_property("actual", f"jobs {', '.join(statuses)}; no orphan files")
    record_property("data_lost", "no" if statuses.count("succeeded") == 2 else "yes: a queued job")
    assert statuses == ["cancelled", "failed", "succeeded", "succeeded"]


def test_a_worker_killed_in_training_or_release_is_recovered_at_once(guarded_model, tmp_path, record_property):
    from freezeasguard.service.worker import Worker

    record_property("expected", "after SIGKILL in training and in release: requeued at once, resumed from the "
                                "checkpoint, the same artefacts")
    # the release (sampling, verify, publish) lasts long enough to be hit
    cfg, config, secret = _real_config(tmp_path, guarded_model, sample_steps=40)
    auth = {"Authorization": f"Bearer {secret}"}
    api = Api(cfg)

    def job(job_id: str) -> dict[str, Any]:
        return api.client.get(f"/v1/fine-tunes/{job_id}", headers=auth).json()

    def submit(**fields: Any) -> str:
        r = api.client.post("/v1/fine-tunes", headers=auth, data={k: str(v) for k, v in fields.items()},
                            files={"file": ("data.zip", make_zip(dataset_members()), "application/zip")})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    workers = {name: start_cli(["worker", "--config", str(config)], tmp_path / f"worker-{name}.log")
               for name in ("a", "b")}
    by_pid = {w.pid: w for w in workers.values()}
    procs = list(workers.values())
    try:
        # Training: the worker holding the job dies; the other, already running, requeues it within seconds
        # (the lease would take 300 s) and resumes it from its checkpoint.
        trained = submit(method="lora", steps=30)
        running = wait_for(lambda: (j := job(trained))["status"] == "running" and j["step"] >= 2 and j, 120,
                            "training to reach step 2")
        holder = by_pid.pop(int(_rows(cfg)[trained].worker_id.rsplit(":", 1)[1]))
        holder.kill()
        holder.wait()
        assert running["step"] < 30, "the job finished before its worker could be killed"
        done = wait_for(lambda: (j := job(trained))["status"] in ("succeeded", "failed", "cancelled") and j, 90,
                         "the surviving worker to finish the job")
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2 and done["result"]["savings"]["resumed_from_step"] >= 2
        events = [e["message"] for e in api.client.get(f"/v1/fine-tunes/{trained}/events", headers=auth).json()["data"]]
        assert any("stopped without finishing the job; requeued" in m for m in events), events

        # Release: killed after training, while the result is sampled, verified and published.
        released = submit(method="lora", steps=2)
        run = cfg.root / "jobs" / released / "run"
        wait_for(lambda: (run / "finetune.json").is_file(), 120, "training to end")
        (survivor,) = by_pid.values()
        survivor.kill()
        survivor.wait()
        assert job(released)["status"] == "running", "the job was released before its worker could be killed"
        assert not (run.parent / "artifacts").exists()
        # The next worker to start (here in this process) recovers the job at once and finishes it. A worker
        # takes seconds to start; this one starts at once, so it first lets the dead worker's last lease renewal
        # age past the two heartbeats within which a live worker may still be about to lock its job.
        time.sleep(2 * cfg.heartbeat_seconds)
        assert Worker(cfg).run(exit_when_idle=True) == 1
        done = job(released)
        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        listing = {a["name"]: a for a in api.client.get(f"/v1/fine-tunes/{released}/artifacts",
                                                        headers=auth).json()["data"]}
        lora = api.client.get(listing["pytorch_lora_weights.safetensors"]["url"], headers=auth)
        assert hashlib.sha256(lora.content).hexdigest() == listing["pytorch_lora_weights.safetensors"]["sha256"]
        assert done["result"]["audit"]["compliant"] is True
        assert {j.status for j in _rows(cfg).values()} == {"succeeded"}
        record_property("actual", "both jobs succeeded on their second attempt, the first resumed from its checkpoint; "
                                  "artefacts match their digests and verify")
        record_property("data_lost", "no")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------------- cancel and revoke
def test_cancel_works_in_every_unfinished_state(service_config):
    """Being checked by a live API: the check stops at its next look and removes the upload; queued: at once.
    (A check whose API process died, a running job and one whose worker died: in the tests above and in
    test_service.py.)"""
    api = Api(service_config())
    headers = api.key(max_concurrent_jobs=1)
    answer: dict[str, Any] = {}
    submitting = threading.Thread(target=lambda: answer.update(r=api.submit(headers, _slow_to_check_zip())))
    submitting.start()
    checked = _being_checked(api.cfg)
    r = api.client.post(f"/v1/fine-tunes/{checked}/cancel", headers=headers)
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    submitting.join()
    assert answer["r"].status_code == 201 and answer["r"].json()["status"] == "cancelled", answer["r"].text
    assert checked not in api.job_folders()

    queued = api.submit(headers).json()["id"]  # the cancelled check holds no slot
    r = api.client.post(f"/v1/fine-tunes/{queued}/cancel", headers=headers)
    assert r.json()["status"] == "cancelled"
    r = api.client.post(f"/v1/fine-tunes/{queued}/cancel", headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_revoking_a_key_cancels_its_queued_and_running_jobs(service_config):
    from freezeasguard.service.db import ApiKey
    from freezeasguard.service.worker import Worker

    api = Api(service_config())
    headers = api.key("mallory", max_concurrent_jobs=3)
    running = api.submit(headers, method="lora", steps=2000).json()["id"]
    queued = api.submit(headers).json()["id"]
    with api.app.state.sessions() as s:
        key_id = s.query(ApiKey).filter(ApiKey.name == "mallory").one().id
    revoked: dict[str, Any] = {}

    def revoke_when_running() -> None:
        wait_for(lambda: (j := _rows(api.cfg)[running]).status == "running" and j.step >= 2, 120, "step 2")
        revoked["cli"] = subprocess.run([sys.executable, "-m", "freezeasguard", "keys", "revoke", key_id,
                                         "--data-dir", str(api.cfg.root)], env=process_env(), capture_output=True,
                                        text=True, timeout=120)

    t = threading.Thread(target=revoke_when_running)
    t.start()
    Worker(api.cfg).run(exit_when_idle=True)  # main thread: the training loop's interrupt needs it
    t.join()
    assert revoked["cli"].returncode == 0 and "cancelled its 2 unfinished job(s)" in revoked["cli"].stdout, revoked
    rows = _rows(api.cfg)
    assert rows[queued].status == "cancelled" and rows[queued].attempts == 0
    assert rows[running].status == "cancelled" and 2 <= rows[running].step < 2000
    assert not (api.cfg.root / "jobs" / running / "artifacts").exists()


# ---------------------------------------------------------------------------- uploads
def _image_as(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


def _with(extra: dict[str, bytes]) -> bytes:
    return make_zip({**dataset_members(), **extra})


def _over_total_pixels() -> bytes:
    """Four 64 x 64 images against a limit of 10,000 pixels in all: the third crosses it. Its pixel data is cut
    off, so the refusal must come from the headers, before anything is decoded."""
    members = dataset_members(side=64)
    members["2.png"] = members["2.png"][:200]
    return make_zip(members)


HOSTILE_UPLOADS = [
    # (case, archive, config overrides, status, the entry the error must name, and what it must say)
    ("a TIFF named .png", _with({"4.png": _image_as("TIFF")}), {}, 400, "4.png", "not a decodable image"),
    ("an EPS named .png", _with({"4.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"}), {}, 400,
     "4.png", "not a decodable image"),
    ("a file where the archive also has a folder", _with({"0.png/notes.txt": b"x"}), {}, 400, "0.png/notes.txt",
     "cannot be stored"),
    ("a name too long for the filesystem", _with({"a" * 300 + ".png": png_bytes()}), {}, 400, "a" * 300 + ".png",
     "cannot be stored"),
    ("more pixels in all than one upload may hold", _over_total_pixels(), {"max_total_pixels": 10_000}, 413,
     "2.png", "limit of 10,000 for one upload"),
]


@pytest.mark.parametrize("case, archive, overrides, status, entry, says", HOSTILE_UPLOADS,
                         ids=[c[0].replace(" ", "-") for c in HOSTILE_UPLOADS])
def test_every_hostile_upload_gets_a_4xx_json_error_naming_the_entry(case, archive, overrides, status, entry, says,
                                                                      service_config, tmp_path, record_property):
    api = Api(service_config(data_dir=str(tmp_path / case.replace(" ", "-")), **overrides))
    headers = api.key()
    r = api.submit(headers, archive)
    record_property("expected", f"{status}, naming {entry[:40]}")
    record_property("actual", f"{r.status_code}: {r.json().get('error', {}).get('message', r.text)}")
    assert r.status_code == status, (case, r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == "invalid_training_file" and err["param"] == "file", (case, err)
    assert entry in err["message"] and says in err["message"], (case, err["message"])
    assert api.jobs_in_db() == 0 and api.job_folders() == [], case


def test_the_total_pixel_limit_has_a_default_for_a_few_hundred_large_images():
    from freezeasguard.service.config import ServiceConfig

    assert ServiceConfig(guard="g.json").max_total_pixels == 300 * 1024 * 1024
    with pytest.raises(ValueError, match="max_total_pixels"):
        ServiceConfig(guard="g.json", max_total_pixels=0)


# ---------------------------------------------------------------------------- what users receive
def test_nothing_a_user_receives_names_a_server_path(service_config, guarded_model, tmp_path):
    from freezeasguard.service.worker import Worker

    api = Api(service_config())
    headers = api.key()
    good = api.submit(headers, method="lora", steps=2).json()["id"]
    lost = api.submit(headers, steps=2).json()["id"]
    shutil.rmtree(api.cfg.root / "jobs" / lost / "data")  # the publisher's disk lost an upload: the job fails
    Worker(api.cfg).run(exit_when_idle=True)

    received = [api.client.get("/v1/fine-tunes", headers=headers).text,
                api.client.get("/v1/models", headers=headers).text]
    for job_id in (good, lost):
        received += [api.client.get(f"/v1/fine-tunes/{job_id}", headers=headers).text,
                     api.client.get(f"/v1/fine-tunes/{job_id}/events", headers=headers).text]
    for art in api.client.get(f"/v1/fine-tunes/{good}/artifacts", headers=headers).json()["data"]:
        if art["name"].endswith(".json"):
            received.append(api.client.get(art["url"], headers=headers).text)
    text = "\n".join(received)
    model, guard = guarded_model
    for path in {str(api.cfg.root), str(tmp_path), str(model), str(guard.parent), str(Path.home())}:
        assert path not in text, path
    job = api.client.get(f"/v1/fine-tunes/{good}", headers=headers).json()
    assert job["status"] == "succeeded", job["error"]
    verify_json = api.client.get(f"/v1/fine-tunes/{good}/artifacts/verify.json", headers=headers).json()
    assert verify_json["derivative"] == "run/lora/pytorch_lora_weights.safetensors"
    failed = api.client.get(f"/v1/fine-tunes/{lost}", headers=headers).json()
    assert failed["status"] == "failed" and "data" in failed["error"]["message"], failed["error"]


# ---------------------------------------------------------------------------- hyperparameters
def test_bounds_defaults_and_the_openapi_schema_come_from_one_model(service_config):
    from freezeasguard.service.config import ServiceConfig

    api = Api(service_config(methods=("lora",), default_method="lora", max_steps=7, default_steps=3,
                             max_batch_size=5, default_batch_size=5, min_learning_rate=1e-5, max_learning_rate=1e-3,
                             default_learning_rate=2e-4, max_lora_rank=6, default_lora_rank=6))
    headers = api.key()
    schema = api.client.get("/openapi.json").json()["paths"]["/v1/fine-tunes"]["post"]["requestBody"]
    form = schema["content"]["multipart/form-data"]["schema"]["properties"]
    shown = api.client.get("/v1/models", headers=headers).json()["data"][0]
    for name, expected in {"method": {"enum": ["lora"], "default": "lora"},
                           "steps": {"minimum": 1, "maximum": 7, "default": 3},
                           "batch_size": {"minimum": 1, "maximum": 5, "default": 5},
                           "learning_rate": {"minimum": 1e-5, "maximum": 1e-3, "default": 2e-4},
                           "lora_rank": {"minimum": 1, "maximum": 6, "default": 6},
                           "seed": {"minimum": 0, "maximum": 2**31 - 1, "default": 0}}.items():
        for where in (form[name], shown["hyperparameters"][name]):
            assert {k: where.get(k) for k in expected} == expected, (name, where)
        assert shown["defaults"][name] == expected["default"]

    # What the schema says is what is enforced: the bound passes, one beyond it does not. A valid submission
    # reaches the upload check (a non-archive here, so no job is made); an invalid one stops before it.
    def refused_for(**fields: Any) -> str | None:
        err = api.submit(headers, b"not an archive", **fields).json()["error"]
        return err["param"] if err["code"] != "invalid_training_file" else None

    for name, bound, beyond in (("steps", 7, 8), ("batch_size", 5, 6), ("learning_rate", 1e-3, 2e-3),
                                ("lora_rank", 6, 7), ("seed", 2**31 - 1, 2**31), ("method", "lora", "full")):
        assert refused_for(**{name: bound}) is None, name
        assert refused_for(**{name: beyond}) == name, name
    with pytest.raises(ValueError, match="default_steps"):
        ServiceConfig(guard="g.json", max_steps=10, default_steps=20)


# ---------------------------------------------------------------------------- start-up
def test_serve_and_worker_refuse_to_start_with_a_guard_for_another_model(service_config, tiny_latent_dir, tmp_path):
    from typer.testing import CliRunner

    from freezeasguard.cli import app
    from freezeasguard.guard import Guard
    from freezeasguard.model import DiffusionModel
    from freezeasguard.service.api import create_app
    from freezeasguard.service.worker import Worker

    other = tmp_path / "other-guard.json"
    Guard.random(DiffusionModel.from_pretrained(tiny_latent_dir).unet, 0.3, seed=0).save(other)
    cfg = service_config(guard=str(other))
    for start in (lambda: create_app(cfg), lambda: Worker(cfg)):
        with pytest.raises(ValueError, match="does not fit the model.*every job would fail") as refused:
            start()
        assert refused.type.__name__ == "ServiceStartError"

    config = tmp_path / "service.json"
    config.write_text(json.dumps(cfg.to_dict()))
    for args in (["serve", "--config", str(config), "--port", str(free_port())],
                 ["worker", "--config", str(config), "--exit-when-idle"]):
        result: dict[str, Any] = {}
        # In a thread: a `serve` that did start would serve until stopped, and must fail this test, not hang it.
        t = threading.Thread(target=lambda out, argv: out.update(r=CliRunner().invoke(app, argv)),
                             args=(result, args), daemon=True)
        t.start()
        t.join(120)
        assert "r" in result, f"{args[0]} started with a guard made for another model"
        r = result["r"]
        assert r.exit_code == 2 and "does not fit the model" in r.output and "made for another model" in r.output, \
            (args[0], r.exit_code, r.output)
    assert not (cfg.root / "service.json").exists()  # serve wrote no config for workers to pick up
