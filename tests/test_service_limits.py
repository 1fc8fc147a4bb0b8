"""Publisher limits around jobs: the per-job time limit and the retention of finished jobs' files."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")

from service_helpers import Api, guarded_model, service_config  # noqa: E402,F401


def _run_worker(cfg, **kwargs):
    from freezeasguard.service.worker import Worker

    return Worker(cfg).run(exit_when_idle=True, **kwargs)


def _job(api, headers, job_id):
    return api.client.get(f"/v1/fine-tunes/{job_id}", headers=headers).json()


# ---------------------------------------------------------------------------- time limit
def test_a_job_running_past_the_time_limit_fails_with_timeout_and_releases_nothing(service_config):
    api = Api(service_config(max_job_seconds=3.0))
    headers = api.key()
    job_id = api.submit(headers, method="lora", steps=2000).json()["id"]
    t0 = time.monotonic()
    _run_worker(api.cfg)
    assert time.monotonic() - t0 < 60
    job = _job(api, headers, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    assert "3 s" in job["error"]["message"] and "nothing is released" in job["error"]["message"]
    assert job["step"] < 2000 and job["timings"]["running_s"] >= 3.0
    assert api.client.get(f"/v1/fine-tunes/{job_id}/artifacts", headers=headers).status_code == 409
    assert not (api.cfg.root / "jobs" / job_id / "artifacts").exists()


def test_a_job_already_past_its_limit_when_claimed_again_fails_at_once(service_config):
    from freezeasguard.service.db import Job

    api = Api(service_config(max_job_seconds=60.0))
    headers = api.key()
    job_id = api.submit(headers).json()["id"]
    with api.app.state.sessions() as s:  # a job first started two minutes ago, whose worker died
        s.query(Job).filter(Job.id == job_id).update({"started_at": time.time() - 120})
        s.commit()
    _run_worker(api.cfg)
    job = _job(api, headers, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout" and job["step"] == 0


def test_no_time_limit_with_zero(service_config):
    from freezeasguard.service.config import ServiceConfig

    api = Api(service_config(max_job_seconds=0))
    headers = api.key()
    job_id = api.submit(headers, steps=2).json()["id"]
    _run_worker(api.cfg)
    assert _job(api, headers, job_id)["status"] == "succeeded"
    with pytest.raises(ValueError, match="max_job_seconds"):
        ServiceConfig(guard="g.json", max_job_seconds=-1)


# ---------------------------------------------------------------------------- retention
def test_retention_deletes_finished_jobs_files_and_keeps_the_row(service_config):
    from freezeasguard.service.retention import sweep_expired

    api = Api(service_config(retention_days=1.0))
    headers = api.key(max_concurrent_jobs=5)
    done = api.submit(headers, steps=2).json()["id"]
    _run_worker(api.cfg)
    cancelled = api.submit(headers).json()["id"]
    api.client.post(f"/v1/fine-tunes/{cancelled}/cancel", headers=headers)
    queued = api.submit(headers).json()["id"]
    job = _job(api, headers, done)
    assert job["status"] == "succeeded" and job["expired_at"] is None
    assert job["expires_at"] == pytest.approx(job["finished_at"] + 86400)
    folders = {j: api.cfg.root / "jobs" / j for j in (done, cancelled, queued)}
    S = api.app.state.sessions

    # Within the retention period nothing goes.
    assert sweep_expired(api.cfg, S, now=job["finished_at"] + 0.9 * 86400) == []
    assert all(f.is_dir() for f in folders.values())
    assert api.client.get(f"/v1/fine-tunes/{done}/artifacts", headers=headers).status_code == 200

    later = time.time() + 1.1 * 86400
    assert sorted(sweep_expired(api.cfg, S, now=later)) == sorted([done, cancelled])
    assert not folders[done].exists() and not folders[cancelled].exists()
    assert (folders[queued] / "data").is_dir()  # an unfinished job keeps its upload
    job = _job(api, headers, done)
    assert job["status"] == "succeeded" and job["expired_at"] == pytest.approx(later)
    assert job["result"]["audit"]["compliant"] is True  # what the job was stays visible
    for path in ("/artifacts", "/artifacts/finetune.json"):
        r = api.client.get(f"/v1/fine-tunes/{done}{path}", headers=headers)
        assert r.status_code == 410, (path, r.text)
        assert r.json()["error"]["code"] == "artifacts_expired"
        assert "1 day(s)" in r.json()["error"]["message"]
    assert _job(api, headers, cancelled)["status"] == "cancelled"
    assert sweep_expired(api.cfg, S, now=later + 86400) == []  # swept once


def test_workers_and_a_restarted_api_sweep_and_zero_keeps_forever(service_config):
    api = Api(service_config(retention_days=0))
    headers = api.key()
    job_id = api.submit(headers, steps=2).json()["id"]
    _run_worker(api.cfg)
    folder = api.cfg.root / "jobs" / job_id
    Api(api.cfg)
    _run_worker(api.cfg)
    assert folder.is_dir() and _job(api, headers, job_id)["expires_at"] is None

    tiny = service_config(retention_days=1e-9)  # 86 microseconds
    _run_worker(tiny)  # an idle worker sweeps before it looks for work
    assert not folder.exists()
    assert api.client.get(f"/v1/fine-tunes/{job_id}/artifacts", headers=headers).status_code == 410

    other = Api(tiny).key("bob")
    job2 = Api(service_config()).submit(other, steps=2).json()["id"]
    _run_worker(service_config())
    Api(tiny)  # the API sweeps at start-up
    assert not (api.cfg.root / "jobs" / job2).exists()


def test_an_older_database_gains_the_new_columns(tmp_path):
    """A database made before `expired_at` existed opens, and gains the column, rows intact."""
    import sqlalchemy as sa

    from freezeasguard.service.db import create_key, make_engine, session_factory

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    with session_factory(engine)() as s:
        create_key(s, "old")
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE jobs DROP COLUMN expired_at"))
    engine.dispose()
    assert "expired_at" not in {c["name"] for c in sa.inspect(sa.create_engine(url)).get_columns("jobs")}
    again = make_engine(url)
    assert "expired_at" in {c["name"] for c in sa.inspect(again).get_columns("jobs")}
    with again.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM api_keys")).scalar() == 1


def test_jobs_status_shows_retention():
    from freezeasguard.cli.jobs_cmd import _describe

    job = {"id": "ftjob-1", "status": "succeeded", "step": 2, "total_steps": 2, "expires_at": 86400.0 * 365}
    assert "files kept until 1971-01-01 00:00 UTC" in _describe(job)
    assert "files deleted 1970-01-02 00:00 UTC" in _describe({**job, "expired_at": 86400.0})
    assert "files" not in _describe({**job, "expires_at": None})
