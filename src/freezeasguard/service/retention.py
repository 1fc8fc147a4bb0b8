"""Retention: the uploads, runs and artefacts of jobs finished more than `retention_days` ago are deleted.

The job row stays, status unchanged, with `expired_at` set, so the user still sees what the job was and
`GET .../artifacts` answers 410 Gone saying why. Workers sweep (at most every SWEEP_EVERY_S) and so does the API
at start-up. Files go first, the mark second: a sweep that dies between the two leaves an unmarked job with no
files, which the next sweep marks; several sweepers at once only repeat an idempotent delete.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from sqlalchemy import select, update

from .config import ServiceConfig, job_dir
from .db import TERMINAL, Job

SWEEP_EVERY_S = 600.0


def expiry_time(cfg: ServiceConfig, finished_at: float | None) -> float | None:
    """When a job finished at `finished_at` loses its files (None: never)."""
    if not cfg.retention_days or finished_at is None:
        return None
    return finished_at + cfg.retention_days * 86400.0


def sweep_expired(cfg: ServiceConfig, sessions: Any, now: float | None = None) -> list[str]:
    """Delete the files of finished jobs past retention; returns the ids of the jobs it expired."""
    if not cfg.retention_days:
        return []
    now = time.time() if now is None else now
    cutoff = now - cfg.retention_days * 86400.0
    with sessions() as s:
        due = s.scalars(select(Job.id).where(Job.status.in_(TERMINAL), Job.finished_at < cutoff,
                                             Job.expired_at.is_(None))).all()
    for job_id in due:
        shutil.rmtree(job_dir(cfg, job_id), ignore_errors=True)
        with sessions() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.expired_at.is_(None)).values(expired_at=now))
            s.commit()
    return list(due)
