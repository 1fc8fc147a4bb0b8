"""The fine-tuning service's API on SQLite through FastAPI's test client, with workers run in-process."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")

from service_helpers import Api, api, dataset_members, guarded_model, make_zip, service_config  # noqa: E402,F401


def _run_worker(cfg, **kwargs):
    from freezeasguard.service.worker import Worker

    return Worker(cfg, worker_id=kwargs.pop("worker_id", None)).run(exit_when_idle=True, **kwargs)


# ---------------------------------------------------------------------------- the round trip
def test_lora_job_round_trip_publishes_a_verified_adapter_and_survives_a_restart(api, tmp_path, guarded_model):
    from freezeasguard.audit import verify
    from freezeasguard.guard import Guard

    headers = api.key()
    r = api.submit(headers, method="lora", steps=4, batch_size=2, lora_rank=2, seed=3)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["object"] == "fine_tuning.job"
    assert job["hyperparameters"] == {"method": "lora", "steps": 4, "batch_size": 2, "learning_rate": 1e-4,
                                      "lora_rank": 2, "seed": 3}
    # Nothing can be downloaded before the job has run and passed the audit.
    assert api.client.get(f"/v1/fine-tunes/{job['id']}/artifacts", headers=headers).status_code == 409

    assert _run_worker(api.cfg) == 1
    job = api.client.get(f"/v1/fine-tunes/{job['id']}", headers=headers).json()
    assert job["status"] == "succeeded", job["error"]
    assert job["step"] == 4 and job["progress"] == 1.0 and job["loss"] is not None
    assert job["timings"]["running_s"] > 0 and job["peak_memory_bytes"] > 0
    savings = job["result"]["savings"]
    assert 0 < savings["trainable_parameters"] < savings["full_finetune_parameters"]
    assert savings["optimizer_state_bytes"] < savings["full_finetune_optimizer_state_bytes_estimate"]
    assert job["result"]["audit"]["compliant"] is True
    messages = [e["message"] for e in api.client.get(f"/v1/fine-tunes/{job['id']}/events", headers=headers).json()["data"]]
    assert any(m.startswith("verify: compliant") for m in messages), messages

    listing = {a["name"]: a for a in api.client.get(f"/v1/fine-tunes/{job['id']}/artifacts", headers=headers).json()["data"]}
    assert set(listing) == {"pytorch_lora_weights.safetensors", "finetune.json", "verify.json", "samples.png"}
    r = api.client.get(listing["pytorch_lora_weights.safetensors"]["url"], headers=headers)
    assert r.status_code == 200
    lora = tmp_path / "dl" / "pytorch_lora_weights.safetensors"
    lora.parent.mkdir()
    lora.write_bytes(r.content)
    assert verify(lora, Guard.load(guarded_model[1])).compliant
    assert api.client.get(f"/v1/fine-tunes/{job['id']}/artifacts/..%2Fdata%2F0.png", headers=headers).status_code == 404

    # A restarted API (same data folder and database) still has the job and its artefacts.
    again = Api(api.cfg)
    assert again.client.get(f"/v1/fine-tunes/{job['id']}", headers=headers).json()["status"] == "succeeded"
    assert again.client.get(listing["finetune.json"]["url"], headers=headers).status_code == 200


def test_models_lists_the_release_and_guard_digest(api, guarded_model):
    from freezeasguard.utils.files import file_sha256

    data = api.client.get("/v1/models", headers=api.key()).json()["data"]
    assert len(data) == 1
    assert data[0]["guard"]["sha256"] == file_sha256(guarded_model[1])
    assert data[0]["guard"]["frozen_tensors"] > 0
    assert api.client.get("/openapi.json").json()["paths"]["/v1/fine-tunes"]["post"]["requestBody"]
    assert api.client.get("/docs").status_code == 200


# ---------------------------------------------------------------------------- enforcement
def test_publisher_fixed_and_out_of_range_options_are_refused(api):
    headers = api.key()
    for field in ("guard", "model", "lora_targets"):
        r = api.submit(headers, **{field: "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == field
        assert "publisher" in r.json()["error"]["message"]
    for field, value in (("steps", 100000), ("batch_size", 0), ("learning_rate", 1.0), ("lora_rank", 999),
                         ("method", "dreambooth"), ("steps", "many")):
        r = api.submit(headers, **{field: value})
        assert r.status_code == 400, (field, value)
        assert r.json()["error"] == {"code": "invalid_hyperparameters", "param": field,
                                     "message": r.json()["error"]["message"]}
        assert field in r.json()["error"]["message"]
    r = api.submit(headers, nonsense=1)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_parameter"
    assert api.jobs_in_db() == 0 and api.job_folders() == []


def test_a_derivative_that_fails_verify_is_never_released(api, monkeypatch):
    """The gate after training: if the written model does not pass `verify`, the job fails and nothing is
    published, even when `finetune` itself reported success."""
    from safetensors.torch import load_file, save_file

    import freezeasguard.finetuning as ft

    real = ft.finetune

    def finetune_then_tamper(model, data, *, guard, config, output_dir, **kwargs):
        result = real(model, data, guard=guard, config=config, output_dir=output_dir, **kwargs)
        f = output_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"
        tensors = load_file(str(f))
        tensors[guard.frozen[0]] = tensors[guard.frozen[0]] + 1.0
        save_file(tensors, str(f))
        return result

    monkeypatch.setattr(ft, "finetune", finetune_then_tamper)
    headers = api.key()
    job = api.submit(headers, method="full", steps=2).json()
    _run_worker(api.cfg)
    job = api.client.get(f"/v1/fine-tunes/{job['id']}", headers=headers).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "guard_violation"
    assert "changed" in job["error"]["message"]
    assert api.client.get(f"/v1/fine-tunes/{job['id']}/artifacts", headers=headers).status_code == 409
    folder = api.cfg.root / "jobs" / job["id"]
    assert not (folder / "artifacts").exists() and not (folder / "run" / "model").exists()


# ---------------------------------------------------------------------------- tenancy
def test_auth_missing_invalid_revoked_and_other_tenant(api):
    from freezeasguard.service.db import ApiKey, revoke_key

    alice, bob = api.key("alice"), api.key("bob")
    job = api.submit(alice).json()
    r = api.client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = api.client.get("/v1/models", headers={"Authorization": "Bearer fag_not-a-key"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel"), ("GET", "/artifacts"),
                         ("GET", "/artifacts/finetune.json")):
        r = api.client.request(method, f"/v1/fine-tunes/{job['id']}{path}", headers=bob)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "job_not_found"
    assert api.client.get("/v1/fine-tunes", headers=bob).json()["data"] == []
    with api.app.state.sessions() as s:
        keys = s.query(ApiKey).all()
        assert all(alice["Authorization"][7:] not in (k.key_hash, k.name) for k in keys)  # stored hashed
        revoke_key(s, next(k.id for k in keys if k.name == "alice"))
    r = api.client.get(f"/v1/fine-tunes/{job['id']}", headers=alice)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# ---------------------------------------------------------------------------- quotas and concurrency
def test_twenty_concurrent_submissions_are_all_accounted_for(service_config):
    api = Api(service_config(max_concurrent_jobs=50))
    headers = api.key()
    archive = make_zip(dataset_members())
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: api.submit(headers, archive), range(20)))
    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses if r.status_code != 201]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 20
    listed = api.client.get("/v1/fine-tunes?limit=100", headers=headers).json()["data"]
    assert {j["id"] for j in listed} == ids and {j["status"] for j in listed} == {"queued"}
    assert api.jobs_in_db() == 20 and sorted(api.job_folders()) == sorted(ids)


def test_concurrent_quota_holds_under_twenty_simultaneous_submissions(api):
    headers = api.key(max_concurrent_jobs=5)
    archive = make_zip(dataset_members())
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: api.submit(headers, archive), range(20)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] * 5 + [429] * 15
    assert all(r.json()["error"]["code"] == "quota_exceeded" for r in responses if r.status_code == 429)
    assert api.jobs_in_db() == 5 and len(api.job_folders()) == 5


def test_steps_per_day_quota(api):
    headers = api.key(max_steps_per_day=10)
    assert api.submit(headers, steps=6).status_code == 201
    r = api.submit(headers, steps=6)
    assert r.status_code == 429 and r.json()["error"]["param"] == "steps"
    assert api.submit(headers, steps=4).status_code == 201


# ---------------------------------------------------------------------------- cancel
def test_cancel_a_queued_job_and_a_finished_one(api):
    headers = api.key()
    job = api.submit(headers).json()
    r = api.client.post(f"/v1/fine-tunes/{job['id']}/cancel", headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert _run_worker(api.cfg) == 0  # nothing left to claim
    r = api.client.post(f"/v1/fine-tunes/{job['id']}/cancel", headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_cancel_a_running_job_stops_it_at_a_step_boundary(api):
    headers = api.key()
    job = api.submit(headers, method="lora", steps=2000).json()

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            j = api.client.get(f"/v1/fine-tunes/{job['id']}", headers=headers).json()
            if j["status"] == "running" and j["step"] >= 2:
                api.client.post(f"/v1/fine-tunes/{job['id']}/cancel", headers=headers)
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    _run_worker(api.cfg)  # main thread: the training loop's SIGINT handling needs it
    canceller.join()
    j = api.client.get(f"/v1/fine-tunes/{job['id']}", headers=headers).json()
    assert j["status"] == "cancelled"
    assert 2 <= j["step"] < 2000
    assert api.client.get(f"/v1/fine-tunes/{job['id']}/artifacts", headers=headers).status_code == 409


# ---------------------------------------------------------------------------- the queue
def test_claims_are_exclusive_and_an_expired_lease_moves_the_job(api):
    from freezeasguard.service.db import Job, claim, finish, heartbeat

    headers = api.key()
    job_id = api.submit(headers).json()["id"]
    digest = api.client.get("/v1/models", headers=headers).json()["data"][0]["guard"]["sha256"]
    S = api.app.state.sessions
    with S() as s:
        assert claim(s, "w1", "another-guard", 10) is None  # workers only take jobs of their own guard
        got = claim(s, "w1", digest, 10)
        assert got is not None and got.id == job_id and got.attempts == 1
        assert claim(s, "w2", digest, 10) is None  # leased: nobody else gets it
        assert heartbeat(s, job_id, "w1", 10, step=3) == (True, False)
        s.query(Job).filter(Job.id == job_id).update({"lease_expires_at": time.time() - 1})
        s.commit()
        again = claim(s, "w2", digest, 10)
        assert again is not None and again.attempts == 2 and again.worker_id == "w2" and again.step == 3
        assert heartbeat(s, job_id, "w1", 10) == (False, False)  # w1 learns it lost the job
        assert finish(s, job_id, "w1", "succeeded") is False
        assert finish(s, job_id, "w2", "queued") is True
        assert s.get(Job, job_id, populate_existing=True).status == "queued"


def test_serve_without_the_extra_names_it(monkeypatch, guarded_model, tmp_path):
    import sys

    from typer.testing import CliRunner

    from freezeasguard.cli import app

    monkeypatch.setitem(sys.modules, "fastapi", None)
    r = CliRunner().invoke(app, ["serve", "--guard", str(guarded_model[1]), "--data-dir", str(tmp_path)])
    assert r.exit_code == 2
    assert "freezeasguard[serve]" in r.output


def test_keys_cli_create_list_revoke(tmp_path):
    from typer.testing import CliRunner

    from freezeasguard.cli import app
    from freezeasguard.service.db import authenticate, make_engine, session_factory

    runner = CliRunner()
    r = runner.invoke(app, ["keys", "create", "--name", "carol", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    secret = r.stdout.splitlines()[0]
    S = session_factory(make_engine(f"sqlite:///{tmp_path / 'service.db'}"))
    with S() as s:
        key = authenticate(s, secret)
    assert key is not None and key.name == "carol"
    listing = runner.invoke(app, ["keys", "list", "--data-dir", str(tmp_path)]).stdout
    assert key.id in listing and secret not in listing
    assert runner.invoke(app, ["keys", "revoke", key.id, "--data-dir", str(tmp_path)]).exit_code == 0
    with S() as s:
        assert authenticate(s, secret) is None
    r = runner.invoke(app, ["keys", "revoke", "key_nope", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and "key_nope" in r.output


def test_a_submission_orphaned_mid_validation_fails_and_frees_its_slot_at_once(api):
    """A 'validating_files' row that no live process holds (its API process died): the key's next submission
    fails it and removes its folder before counting the quota, however young it is."""
    from freezeasguard.service.db import Job

    headers = api.key(max_concurrent_jobs=1)
    job_id = api.submit(headers).json()["id"]
    with api.app.state.sessions() as s:
        s.query(Job).filter(Job.id == job_id).update({"status": "validating_files"})
        s.commit()
    assert api.submit(headers).status_code == 201
    job = api.client.get(f"/v1/fine-tunes/{job_id}", headers=headers).json()
    assert job["status"] == "failed" and job["error"]["code"] == "upload_interrupted", job
    assert job_id not in api.job_folders()


def test_sigterm_requeues_the_running_job_at_a_checkpoint_and_the_next_worker_resumes_it(api):
    import os
    import signal

    headers = api.key()
    job = api.submit(headers, method="lora", steps=30).json()

    def term_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            j = api.client.get(f"/v1/fine-tunes/{job['id']}", headers=headers).json()
            if j["status"] == "running" and j["step"] >= 2:
                os.kill(os.getpid(), signal.SIGTERM)  # the worker's handler turns it into a clean stop
                return
            time.sleep(0.05)

    t = threading.Thread(target=term_when_running)
    t.start()
    _run_worker(api.cfg, worker_id="first")
    t.join()
    j = api.client.get(f"/v1/fine-tunes/{job['id']}", headers=headers).json()
    assert j["status"] == "queued" and 2 <= j["step"] < 30
    _run_worker(api.cfg, worker_id="second")
    j = api.client.get(f"/v1/fine-tunes/{job['id']}", headers=headers).json()
    assert j["status"] == "succeeded" and j["attempts"] == 2
    assert j["result"]["savings"]["resumed_from_step"] >= 2


def test_a_guard_replaced_under_a_running_service_fails_the_job_as_a_service_error(service_config, guarded_model,
                                                                                   tiny_latent_dir, tmp_path):
    """Start-up refuses a guard made for another model; one swapped in while the service runs still fails each
    job as the publisher's error (service_error), never as the user's."""
    import shutil

    from freezeasguard.guard import Guard
    from freezeasguard.model import DiffusionModel
    from freezeasguard.service.worker import Worker

    guard = tmp_path / "guard.json"
    shutil.copy(guarded_model[1], guard)
    api = Api(service_config(guard=str(guard)))
    worker = Worker(api.cfg)
    headers = api.key()
    job = api.submit(headers).json()
    Guard.random(DiffusionModel.from_pretrained(tiny_latent_dir).unet, 0.3, seed=0).save(guard)
    worker.run(exit_when_idle=True)
    job = api.client.get(f"/v1/fine-tunes/{job['id']}", headers=headers).json()
    assert job["status"] == "failed" and job["error"]["code"] == "service_error", job["error"]
