"""The service's database: API keys, jobs and job events, on SQLAlchemy (SQLite with WAL by default).

The job table is also the queue. A worker claims a job with one conditional UPDATE (`status='queued'`, or
`running` with an expired lease) and owns it while it renews the lease; the database serialises the claims,
so two workers can never both win the same job, on SQLite or on PostgreSQL (where the candidate is first
selected FOR UPDATE SKIP LOCKED, so concurrent workers pick different jobs). Times are Unix seconds (floats)
so lease arithmetic is the same on every backend.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, create_engine, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

KEY_PREFIX = "fag_"
STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # SHA-256 of the secret: keys are 32 random bytes, so a fast hash is enough (no password stretching needed)
    # and lets a request find its key by an indexed lookup.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: the service's
    max_steps_per_day: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    model: Mapped[str] = mapped_column(String(500))
    guard_digest: Mapped[str] = mapped_column(String(64))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    training_files: Mapped[dict[str, Any]] = mapped_column(JSON)  # upload name, images, bytes
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error_code: Mapped[str | None] = mapped_column(String(60), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # set when retention deleted the job's files (upload, run, artefacts); the row itself is kept
    expired_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(10))
    message: Mapped[str] = mapped_column(Text)


# ---------------------------------------------------------------------------- engine
def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL (readers never block the writer), a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Columns added to a table since a database was created (nullable, so old rows stay valid): create_all
    makes missing tables only, and a service restarted on a newer version must still open its database."""
    from sqlalchemy import inspect, text

    existing = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have and column.nullable:
                    kind = column.type.compile(dialect=engine.dialect)
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


# ---------------------------------------------------------------------------- keys
def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_key(session: Session, name: str, *, max_concurrent_jobs: int | None = None,
               max_steps_per_day: int | None = None) -> tuple[ApiKey, str]:
    """A new key; the secret is returned once and only its hash is stored."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id="key_" + secrets.token_hex(8), name=name, key_hash=hash_key(secret), created_at=time.time(),
                 max_concurrent_jobs=max_concurrent_jobs, max_steps_per_day=max_steps_per_day)
    session.add(key)
    session.commit()
    return key, secret


def revoke_key(session: Session, key_id: str) -> tuple[ApiKey, list[str]]:
    """Revoke a key and cancel its unfinished jobs: queued ones at once, those being checked or trained at their
    holder's next step (a worker stops at the next step boundary; a holder that died is ended by
    `recovery.recover`). Returns the key and the ids of the jobs cancelled or asked to cancel."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise KeyError(f"no API key {key_id!r} (see `freezeasguard keys list`)")
    now = time.time()
    if key.revoked_at is None:
        key.revoked_at = now
    unfinished = session.execute(select(Job.id, Job.status).where(Job.key_id == key_id,
                                                                  Job.status.in_(ACTIVE))).all()
    session.execute(update(Job).where(Job.key_id == key_id, Job.status == "queued")
                    .values(status="cancelled", cancel_requested=True, finished_at=now))
    session.execute(update(Job).where(Job.key_id == key_id, Job.status.in_(ACTIVE))
                    .values(cancel_requested=True))
    for job_id, status in unfinished:
        add_event(session, job_id, "its API key was revoked: " + ("cancelled" if status == "queued"
                                                                  else "cancellation requested"))
    session.commit()
    return key, [job_id for job_id, _ in unfinished]


def authenticate(session: Session, secret: str) -> ApiKey | None:
    """The live key with this secret, or None (unknown and revoked keys look the same to the caller)."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
    if key is None or key.revoked_at is not None:
        return None
    return key


# ---------------------------------------------------------------------------- events
def add_event(session: Session, job_id: str, message: str, level: str = "info") -> None:
    session.add(JobEvent(job_id=job_id, created_at=time.time(), level=level, message=message))


def steps_used_today(session: Session, key_id: str, now: float) -> int:
    """Steps charged to a key over the last 24 h: requested steps of live and succeeded jobs, steps actually run
    of failed and cancelled ones."""
    since = now - 86400
    live = session.scalar(select(func.coalesce(func.sum(Job.total_steps), 0)).where(
        Job.key_id == key_id, Job.created_at >= since, Job.status.in_(ACTIVE + ("succeeded",))))
    ended = session.scalar(select(func.coalesce(func.sum(Job.step), 0)).where(
        Job.key_id == key_id, Job.created_at >= since, Job.status.in_(("failed", "cancelled"))))
    return int(live or 0) + int(ended or 0)


def active_jobs(session: Session, key_id: str) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(
        Job.key_id == key_id, Job.status.in_(ACTIVE))) or 0)


def lock_key(session: Session, key_id: str) -> None:
    """Serialise quota checks of one key: a write on its row comes first in the transaction, so a concurrent
    submission with the same key waits here (SQLite: the database write lock; PostgreSQL: the row lock) and
    then counts the job this one adds."""
    session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=time.time()))


# ---------------------------------------------------------------------------- the queue
def claim(session: Session, worker_id: str, guard_digest: str, lease_seconds: float) -> Job | None:
    """Atomically take the oldest claimable job (queued, or running with an expired lease) for this guard."""
    for _ in range(5):  # another worker may win the candidate between the SELECT and the UPDATE
        now = time.time()
        claimable = ((Job.status == "queued") | ((Job.status == "running") & (Job.lease_expires_at < now)))
        # PostgreSQL (and other servers with row locks): lock the candidate and skip rows other workers are
        # claiming this instant, so concurrent workers take different jobs instead of racing for the oldest.
        # SQLite has no row locks (SQLAlchemy leaves the clause out); its single writer serialises claims.
        candidate = session.scalar(select(Job.id).where(claimable, Job.guard_digest == guard_digest)
                                   .order_by(Job.created_at).limit(1).with_for_update(skip_locked=True))
        if candidate is None:
            session.rollback()
            return None
        won = session.execute(
            update(Job).where(Job.id == candidate, claimable)
            .values(status="running", worker_id=worker_id, lease_expires_at=now + lease_seconds,
                    attempts=Job.attempts + 1, started_at=func.coalesce(Job.started_at, now))
        ).rowcount
        session.commit()
        if won == 1:
            return session.get(Job, candidate, populate_existing=True)
    return None


def heartbeat(session: Session, job_id: str, worker_id: str, lease_seconds: float, *, step: int | None = None,
              loss: float | None = None) -> tuple[bool, bool]:
    """Renew the lease (and record progress): (still ours, cancel requested). Not ours: another worker claimed
    it after our lease expired, and we must stop."""
    values: dict[str, Any] = {"lease_expires_at": time.time() + lease_seconds}
    if step is not None:
        values["step"] = step
    if loss is not None:
        values["loss"] = loss
    ours = session.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
                           .values(**values)).rowcount == 1
    session.commit()
    cancel = bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))
    session.rollback()
    return ours, cancel


def finish(session: Session, job_id: str, worker_id: str, status: str, **values: Any) -> bool:
    """Move our running job to `status` (terminal, or back to 'queued'); False if it is no longer ours, or if
    it would succeed although cancellation was asked for."""
    values = {"status": status, "lease_expires_at": None, **values}
    if status in TERMINAL:
        values.setdefault("finished_at", time.time())
    else:
        values["worker_id"] = None
    ours = [Job.id == job_id, Job.worker_id == worker_id, Job.status == "running"]
    if status == "succeeded":
        ours.append(Job.cancel_requested.is_(False))  # a job asked to cancel is never released
    done = session.execute(update(Job).where(*ours).values(**values)).rowcount == 1
    session.commit()
    return done
