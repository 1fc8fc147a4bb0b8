"""Recovery: no job stays unfinished because the process that was working on it died.

Whoever works on a job holds an exclusive lock on its folder (`job_lock`): the API process while it checks
the upload (taken before the job row exists), the worker while it trains, verifies and publishes (inherited by
launched ranks). The kernel drops the lock when its holders die, however they die (SIGKILL included; on a
shared filesystem, the file server drops it once their machine stops answering), so a free lock on an
unfinished job means its holder is gone, at once and with no age threshold:

- `validating_files` with a free lock: the API process died checking the upload. The job ends `failed`
  (`upload_interrupted`; `cancelled` if cancellation was asked for) and its half-extracted folder is removed:
  a check that was cut short cannot be trusted, and the user still holds the archive.
- `running` with a free lock, claimed or renewed at least two heartbeats ago (a worker locks the folder
  moments after its claim): the worker died. The job goes back to the queue to resume from its last
  checkpoint (`cancelled` if cancellation was asked for), without waiting for its lease to run out.

`recover` runs when the API starts, when a worker starts and every RECOVER_EVERY_S while it runs, before a
key's quota is counted, and on cancel. Without file locks (no `fcntl`), a validation is taken for dead only
after ORPHAN_AGE_S and a running job only when its lease expires.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from .config import ServiceConfig, job_dir
from .db import Job, add_event

RECOVER_EVERY_S = 5.0
NO_LOCK_FILE = -1
ORPHAN_AGE_S = 600.0  # without file locks: no upload check takes this long
UPLOAD_INTERRUPTED = ("the service stopped while it was checking the upload, so nothing was queued; submit the "
                      "archive again")

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def job_lock(folder: Path, *, create: bool = True) -> Iterator[int | None]:
    """An exclusive, non-blocking lock on a job folder: yields its file descriptor (which a launched child can
    inherit to keep holding it), or None when another live process holds it. Without fcntl it yields a
    descriptor and locks nothing (the lease alone guards the job). With `create` False a folder without a lock
    file is not created: it yields NO_LOCK_FILE, as nobody can hold a lock that does not exist."""
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        if create:
            raise
        yield NO_LOCK_FILE
        return
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
        yield fd
    finally:
        os.close(fd)


def recover(cfg: ServiceConfig, sessions: Any, *, key_id: str | None = None,
            job_ids: list[str] | None = None) -> list[str]:
    """End or requeue the unfinished jobs whose holder died (all, one key's, or the listed ones); returns
    their ids."""
    now = time.time()
    # A live worker renews its lease every heartbeat and locks the folder right after claiming it: a lease
    # renewed within the last two heartbeats may belong to a worker that has not locked yet.
    settled = now + cfg.lease_seconds - 2 * cfg.heartbeat_seconds
    query = select(Job.id, Job.status, Job.worker_id, Job.created_at).where(
        (Job.status == "validating_files") | ((Job.status == "running") & (Job.lease_expires_at < settled)))
    if key_id is not None:
        query = query.where(Job.key_id == key_id)
    if job_ids is not None:
        query = query.where(Job.id.in_(job_ids))
    with sessions() as s:
        rows = s.execute(query).all()
    recovered = []
    for job_id, status, worker_id, created_at in rows:
        if fcntl is None and (status == "running" or created_at > now - ORPHAN_AGE_S):
            continue
        folder = job_dir(cfg, job_id)
        try:
            # Never create a lock file here: whoever removes a job's folder changes the job's row first, so a
            # fresh lock file would only stand beside a holder's unlinked one.
            with job_lock(folder, create=False) as fd:
                if fd is None or (fd == NO_LOCK_FILE and status == "running"):
                    continue  # its holder lives (a running job's folder is the worker's; its lease decides)
                with sessions() as s:
                    done = (_end_validation(s, job_id, folder) if status == "validating_files"
                            else _requeue(s, job_id, worker_id, folder))
        except OSError as exc:  # an unreadable job folder must not stop the others' recovery
            log.error("recovery: job %s: %s", job_id, exc)
            continue
        if done:
            recovered.append(job_id)
    if recovered:
        log.warning("recovered %d job(s) whose process died: %s", len(recovered), ", ".join(recovered))
    return recovered


def _end_validation(s: Any, job_id: str, folder: Path) -> bool:
    job = s.get(Job, job_id)
    if job is None or job.status != "validating_files":
        return False
    now = time.time()
    values: dict[str, Any] = ({"status": "cancelled"} if job.cancel_requested else
                              {"status": "failed", "error_code": "upload_interrupted",
                               "error_message": UPLOAD_INTERRUPTED})
    won = s.execute(update(Job).where(Job.id == job_id, Job.status == "validating_files")
                    .values(finished_at=now, lease_expires_at=None, worker_id=None, **values)).rowcount == 1
    if won:
        add_event(s, job_id, "cancelled before the upload was checked" if job.cancel_requested
                  else f"failed: {UPLOAD_INTERRUPTED}", "info" if job.cancel_requested else "error")
    s.commit()
    if won:
        shutil.rmtree(folder, ignore_errors=True)
    return won


def _requeue(s: Any, job_id: str, worker_id: str | None, folder: Path) -> bool:
    job = s.get(Job, job_id)
    if job is None or job.status != "running" or job.worker_id != worker_id:
        return False
    mine = (Job.id == job_id, Job.status == "running", Job.worker_id == worker_id)
    if job.cancel_requested:
        won = s.execute(update(Job).where(*mine).values(status="cancelled", finished_at=time.time(),
                                                        lease_expires_at=None)).rowcount == 1
        message = f"cancelled: worker {worker_id} stopped, and cancellation was asked for"
    else:
        won = s.execute(update(Job).where(*mine).values(status="queued", worker_id=None,
                                                        lease_expires_at=None)).rowcount == 1
        message = f"worker {worker_id} stopped without finishing the job; requeued to resume from its last checkpoint"
    if won:
        add_event(s, job_id, message, "warning")
    s.commit()
    if won and job.cancel_requested:
        shutil.rmtree(folder / "artifacts", ignore_errors=True)
    return won
