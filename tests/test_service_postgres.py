"""The service on PostgreSQL: a throwaway server (the machine's `initdb`/`pg_ctl`, on a Unix socket only) and
the psycopg driver. Skipped, saying why, where either is missing; SQLite runs the same code in test_service.py."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from service_helpers import Api, dataset_members, guarded_model, make_zip, service_config  # noqa: E402,F401


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="module")
def pg_server():
    """(socket directory, port) of a fresh PostgreSQL cluster, stopped and removed afterwards."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'psycopg[binary]'")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    user = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="fag-pg-"))
    root.chmod(0o755)
    data, sock = root / "data", root / "sock"
    data.mkdir()
    sock.mkdir()
    if user is not None:
        for p in (data, sock):
            os.chown(p, user.pw_uid, user.pw_gid)
    as_user = {"user": user.pw_uid, "group": user.pw_gid} if user is not None else {}
    port = 5432 + os.getpid() % 1000 + 1  # only a socket file name here: no TCP listening
    try:
        subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120, **as_user)
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(sock / "log"), "-w", "-t", "60", "-o",
                        f"-k {sock} -c listen_addresses='' -p {port} -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120, **as_user)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {exc}")
    try:
        yield str(sock), port
    finally:
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60, **as_user)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def new_pg_api(pg_server, service_config, tmp_path):
    """Factory: an Api on a new, empty database of the server (and its own data folder)."""
    import psycopg

    sock, port = pg_server

    def make() -> Api:
        name = "fag_" + uuid.uuid4().hex[:12]
        with psycopg.connect(host=sock, port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        api = Api(service_config(database=f"postgresql+psycopg://postgres@/{name}?host={sock}&port={port}",
                                 data_dir=str(tmp_path / name)))
        assert api.app.state.engine.dialect.name == "postgresql"
        return api

    return make


@pytest.fixture
def pg_api(new_pg_api):
    return new_pg_api()


def test_round_trip_on_postgresql(pg_api):
    from freezeasguard.service.worker import Worker

    api = pg_api
    alice, bob = api.key("alice"), api.key("bob")
    job_id = api.submit(alice, method="lora", steps=2).json()["id"]
    assert api.client.get(f"/v1/fine-tunes/{job_id}", headers=bob).status_code == 404
    assert Worker(api.cfg).run(exit_when_idle=True) == 1
    job = api.client.get(f"/v1/fine-tunes/{job_id}", headers=alice).json()
    assert job["status"] == "succeeded" and job["step"] == 2 and job["result"]["audit"]["compliant"], job
    names = {a["name"] for a in api.client.get(f"/v1/fine-tunes/{job_id}/artifacts", headers=alice).json()["data"]}
    assert "pytorch_lora_weights.safetensors" in names
    again = Api(api.cfg)  # a restarted API on the same database
    assert again.client.get(f"/v1/fine-tunes/{job_id}", headers=alice).json()["status"] == "succeeded"


def test_concurrent_quota_on_postgresql(pg_api):
    headers = pg_api.key(max_concurrent_jobs=5)
    archive = make_zip(dataset_members())
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: pg_api.submit(headers, archive), range(20)))
    assert sorted(r.status_code for r in responses) == [201] * 5 + [429] * 15
    assert pg_api.jobs_in_db() == 5 and len(pg_api.job_folders()) == 5


def test_claims_are_atomic_on_postgresql(pg_api):
    """Eight workers race to claim twenty queued jobs at once: every job is claimed exactly once, and no claim
    loses a race (SELECT ... FOR UPDATE SKIP LOCKED: a worker passes over a row another is claiming instead of
    picking the same one and finding it gone at its UPDATE)."""
    from sqlalchemy import event, func, select

    from freezeasguard.service.db import Job, claim

    api = pg_api
    headers = api.key(max_concurrent_jobs=50)
    archive = make_zip(dataset_members(1))
    for _ in range(20):
        assert api.submit(headers, archive).status_code == 201
    digest = api.client.get("/v1/models", headers=headers).json()["data"][0]["guard"]["sha256"]
    S = api.app.state.sessions
    updates: list[int] = []

    @event.listens_for(api.app.state.engine, "after_cursor_execute")
    def _count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE JOBS SET STATUS"):
            updates.append(cursor.rowcount)

    start = threading.Barrier(8)

    def worker(n: int) -> list[str]:
        got = []
        with S() as s:
            start.wait()
            while (job := claim(s, f"w{n}", digest, 60)) is not None:
                got.append(job.id)
        return got

    with ThreadPoolExecutor(8) as pool:
        claimed = [j for got in pool.map(worker, range(8)) for j in got]
    assert len(claimed) == 20 and len(set(claimed)) == 20
    assert updates == [1] * 20, updates  # 20 claim UPDATEs, each won
    with S() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) == 0
        assert s.scalar(select(func.max(Job.attempts))) == 1


def test_sqlite_suite_leases_auth_quotas_and_cancel_on_postgresql(new_pg_api):
    """The SQLite tests of leases, tenancy, quotas and cancellation, run as they are on PostgreSQL."""
    import test_service

    test_service.test_claims_are_exclusive_and_an_expired_lease_moves_the_job(new_pg_api())
    test_service.test_auth_missing_invalid_revoked_and_other_tenant(new_pg_api())
    test_service.test_steps_per_day_quota(new_pg_api())
    test_service.test_cancel_a_queued_job_and_a_finished_one(new_pg_api())
