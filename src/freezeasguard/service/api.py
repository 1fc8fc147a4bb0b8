"""The HTTP API (FastAPI): jobs, events, cancellation, artefacts and the released model, per API key.

Conventions follow the hosted fine-tuning APIs: a job object with `status` (validating_files -> queued ->
running -> succeeded | failed | cancelled), a `hyperparameters` object, an events list and an `error`
object with `code` and `message`. Every error response is `{"error": {"code", "message", "param"}}`, an
unexpected one included. Training never runs here: the API only validates uploads and reads and writes rows,
so it keeps answering while workers train. Nothing it returns names a file by the server's path (`redact`).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import delete, select, update
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..utils.files import file_sha256
from .config import ServiceConfig, job_dir
from .db import (
    TERMINAL,
    ApiKey,
    Job,
    JobEvent,
    active_jobs,
    add_event,
    authenticate,
    lock_key,
    make_engine,
    session_factory,
    steps_used_today,
)
from .hyperparameters import HyperparameterError, hyperparameter_model, parse
from .jobrun import check_release
from .recovery import job_lock, recover
from .redact import redact, redact_text
from .retention import expiry_time, sweep_expired
from .uploads import UploadCancelled, UploadError, extract_upload
from .worker import MANIFEST

_FORM_SLACK = 64 << 10  # multipart framing and the small fields, on top of the archive itself
_CANCEL_POLL_S = 1.0  # how often a running upload check asks whether its job was cancelled

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


class _TooLarge(Exception):
    pass


def _error(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "param": param}}, status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def job_object(job: Job, cfg: ServiceConfig) -> dict[str, Any]:
    """The job as its user sees it (rows written by any version: paths are redacted here too)."""
    now = time.time()
    started, finished = job.started_at, job.finished_at
    result = job.result or {}
    savings = result.get("savings") or {}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "model": job.model,
        "guard_sha256": job.guard_digest,
        "status": job.status,
        "created_at": job.created_at,
        "started_at": started,
        "finished_at": finished,
        "hyperparameters": job.hyperparameters,
        "training_files": job.training_files,
        "step": job.step,
        "total_steps": job.total_steps,
        "progress": job.step / job.total_steps if job.total_steps else 0.0,
        "loss": job.loss,
        "timings": {
            "queued_s": (started or finished or now) - job.created_at if job.status != "validating_files" else None,
            "running_s": ((finished or now) - started) if started else None,
        },
        "peak_memory_bytes": savings.get("peak_memory_bytes"),
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "error": ({"code": job.error_code, "message": redact(job.error_message or "", cfg, job.id)}
                  if job.error_code else None),
        "result": redact(job.result, cfg, job.id),
        # retention: when the job's files (upload, artefacts) are deleted, and when they were
        "expires_at": expiry_time(cfg, finished),
        "expired_at": job.expired_at,
    }


def create_app(cfg: ServiceConfig) -> FastAPI:
    """The API over `cfg`. Refuses (ServiceStartError) a guard that does not fit the model; ends or requeues
    the jobs a crashed process left unfinished (`recovery.recover`) before it answers anything."""
    guard = check_release(cfg)
    cfg.root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(cfg.database_url)
    sessions = session_factory(engine)
    guard_digest = file_sha256(cfg.guard)
    recover(cfg, sessions)
    sweep_expired(cfg, sessions)
    Hyperparameters = hyperparameter_model(cfg)
    model_id = "embedded" if cfg.model == "embedded" else Path(cfg.model).name

    app = FastAPI(title="freezeasguard fine-tuning service", version=__version__,
                  description="Guarded fine-tuning of the publisher's released model: every job trains under the "
                  "publisher's guard (FreezeAsGuard) and its result is audited before it can be downloaded.")
    app.state.config, app.state.engine, app.state.sessions = cfg, engine, sessions
    bearer = HTTPBearer(auto_error=False, description="API key from `freezeasguard keys create`")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "not_found" if exc.status_code == 404 else "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The details (and the server's paths in them) go to the publisher's log, not to the user.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal_error", "the service failed to answer this request; the publisher's log has "
                      "the details")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(400, "invalid_request", f"{param}: {first.get('msg', 'invalid request')}", param)

    def current_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
        if creds is None or not creds.credentials:
            raise APIError(401, "missing_api_key", "no API key: send 'Authorization: Bearer <key>'")
        with sessions() as s:
            key = authenticate(s, creds.credentials)
        if key is None:
            raise APIError(401, "invalid_api_key", "the API key is unknown or revoked")
        return key

    def own_job(s: Any, job_id: str, key: ApiKey) -> Job:
        # Another key's job is reported exactly like a job that does not exist.
        job = s.scalar(select(Job).where(Job.id == job_id, Job.key_id == key.id))
        if job is None:
            raise APIError(404, "job_not_found", f"no fine-tuning job {job_id!r}", "id")
        return job

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", summary="The released model and the guard every job runs under")
    def models(key: ApiKey = Depends(current_key)) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "owned_by": "publisher",
            "guard": {"sha256": guard_digest, **guard.summary()},
            "methods": list(cfg.methods),
            "hyperparameters": Hyperparameters.model_json_schema()["properties"],
            "limits": {k: getattr(cfg, k) for k in ("max_upload_bytes", "max_uncompressed_bytes", "max_files",
                                                    "max_image_pixels", "max_total_pixels")},
            "quotas": {"max_concurrent_jobs": key.max_concurrent_jobs or cfg.max_concurrent_jobs,
                       "max_steps_per_day": key.max_steps_per_day or cfg.max_steps_per_day},
            "defaults": Hyperparameters().model_dump(),
            **({"notes": cfg.extra} if cfg.extra else {}),
        }]}

    def hyperparameters(fields: dict[str, str]) -> dict[str, Any]:
        try:
            return parse(Hyperparameters, fields)
        except HyperparameterError as exc:
            raise APIError(400, exc.code, exc.message, exc.param) from None

    def submit(key: ApiKey, hp: dict[str, Any], upload: Any, filename: str) -> dict[str, Any]:
        recover(cfg, sessions, key_id=key.id)  # a submission of this key whose API process died holds no slot
        job_id = "ftjob-" + secrets.token_hex(12)
        folder = job_dir(cfg, job_id)
        # Locked before the row exists and until the job is queued or gone: recovery never takes a job that is
        # being checked for one whose API process died.
        with job_lock(folder):
            try:
                add_job(key, hp, filename, job_id)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            return check_upload(job_id, folder, upload, filename)

    def add_job(key: ApiKey, hp: dict[str, Any], filename: str, job_id: str) -> None:
        now = time.time()
        with sessions() as s:
            lock_key(s, key.id)
            limit = key.max_concurrent_jobs or cfg.max_concurrent_jobs
            if active_jobs(s, key.id) >= limit:
                raise APIError(429, "quota_exceeded", f"this key already has {limit} unfinished job(s), its limit "
                               "of concurrent jobs; wait for one to finish or cancel one")
            per_day = key.max_steps_per_day or cfg.max_steps_per_day
            used = steps_used_today(s, key.id, now)
            if used + hp["steps"] > per_day:
                raise APIError(429, "quota_exceeded", f"steps: {hp['steps']} more steps would exceed this key's "
                               f"{per_day} steps per 24 h ({used} used)", "steps")
            s.add(Job(id=job_id, key_id=key.id, status="validating_files", model=model_id, guard_digest=guard_digest,
                      hyperparameters=hp, training_files={"filename": filename}, created_at=now,
                      total_steps=hp["steps"], step=0, attempts=0, cancel_requested=False))
            s.commit()

    def check_upload(job_id: str, folder: Path, upload: Any, filename: str) -> dict[str, Any]:
        asked = {"at": time.monotonic()}

        def cancelled() -> bool:
            if time.monotonic() - asked["at"] < _CANCEL_POLL_S:
                return False
            asked["at"] = time.monotonic()
            with sessions() as s:
                return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

        try:
            checked = extract_upload(upload, folder / "data", cfg, cancelled)
        except UploadCancelled:
            checked = None
        except BaseException as exc:
            # A refused upload leaves nothing. The row goes before the files: recovery trusts the row.
            with sessions() as s:
                s.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
                s.execute(delete(Job).where(Job.id == job_id))
                s.commit()
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, UploadError):
                raise APIError(exc.status, "invalid_training_file", redact_text(str(exc), cfg, job_id, unknown_paths=False),
                               "file") from exc
            raise
        with sessions() as s:
            queued = checked is not None and s.execute(
                update(Job).where(Job.id == job_id, Job.status == "validating_files", Job.cancel_requested.is_(False))
                .values(status="queued", training_files={"filename": filename, "images": checked.images,
                                                         "files": checked.files,
                                                         "bytes": checked.uncompressed_bytes})).rowcount == 1
            if queued:
                add_event(s, job_id, f"validated {filename}: {checked.images} image(s); queued")
            else:  # cancelled while it was checked, by its user or by revoking its key
                s.execute(update(Job).where(Job.id == job_id, Job.status == "validating_files")
                          .values(status="cancelled", finished_at=time.time()))
                add_event(s, job_id, "cancelled while its upload was checked")
            s.commit()
            job = s.get(Job, job_id, populate_existing=True)
        if not queued:
            shutil.rmtree(folder, ignore_errors=True)
        return job_object(job, cfg)

    upload_schema = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "additionalProperties": False,
        "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "zip of an image-caption folder (metadata.jsonl/.csv or .txt sidecars)"},
            **Hyperparameters.model_json_schema()["properties"],
        }}}}}}

    @app.post("/v1/fine-tunes", status_code=201, openapi_extra=upload_schema,
              summary="Upload a dataset (zip) and queue a guarded fine-tuning job")
    async def create_job(request: Request, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
        limit = cfg.max_upload_bytes + _FORM_SLACK
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, "upload_too_large", f"the upload is {int(declared):,} bytes; the limit is "
                           f"{cfg.max_upload_bytes:,}", "file")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "invalid_request", "send multipart/form-data with a 'file' field (a zip)", "file")
        received = 0
        receive = request.receive

        async def counted() -> Any:  # streamed bodies have no Content-Length: count what arrives
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge()
            return message

        try:
            form = await Request(request.scope, counted).form(max_files=1, max_fields=len(Hyperparameters.model_fields) + 8)
        except _TooLarge:
            raise APIError(413, "upload_too_large", f"the upload exceeds the limit of {cfg.max_upload_bytes:,} "
                           "bytes", "file") from None
        except Exception as exc:  # malformed multipart, too many fields
            raise APIError(400, "invalid_request", f"unreadable form: {exc}") from exc
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise APIError(400, "invalid_request", "no 'file' field: attach the dataset zip as 'file'", "file")
            fields = {k: v for k, v in form.multi_items() if k != "file" and isinstance(v, str)}
            hp = hyperparameters(fields)
            return await run_in_threadpool(submit, key, hp, upload.file, upload.filename or "upload.zip")
        finally:
            await form.close()

    @app.get("/v1/fine-tunes", summary="This key's jobs, newest first")
    def list_jobs(limit: int = 20, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
        with sessions() as s:
            jobs = s.scalars(select(Job).where(Job.key_id == key.id).order_by(Job.created_at.desc())
                             .limit(max(1, min(limit, 100)))).all()
            return {"object": "list", "data": [job_object(j, cfg) for j in jobs]}

    @app.get("/v1/fine-tunes/{job_id}", summary="A job: status, progress, step, loss, timings, savings")
    def get_job(job_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
        with sessions() as s:
            return job_object(own_job(s, job_id, key), cfg)

    @app.get("/v1/fine-tunes/{job_id}/events", summary="The job's log lines, oldest first")
    def events(job_id: str, after: int = 0, limit: int = 100, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
        with sessions() as s:
            own_job(s, job_id, key)
            rows = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                             .order_by(JobEvent.id).limit(max(1, min(limit, 1000)))).all()
            return {"object": "list", "data": [{"id": e.id, "object": "fine_tuning.job.event", "created_at": e.created_at,
                                                "level": e.level, "message": redact(e.message, cfg, job_id)}
                                               for e in rows]}

    @app.post("/v1/fine-tunes/{job_id}/cancel", summary="Cancel a job in any unfinished state (a running one stops "
              "at its next step, one being checked when its check next looks)")
    def cancel(job_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
        with sessions() as s:
            job = own_job(s, job_id, key)
            if job.status in TERMINAL:
                raise APIError(409, "job_finished", f"job {job_id} is already {job.status}", "id")
            # Queued: cancelled at once. Being checked or running: flagged; its holder stops at the next chance.
            done = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                             .values(status="cancelled", cancel_requested=True, finished_at=time.time())).rowcount
            if not done:
                s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL))
                          .values(cancel_requested=True))
            add_event(s, job_id, "cancelled" if done else "cancellation requested")
            s.commit()
        if not done:
            recover(cfg, sessions, job_ids=[job_id])  # a holder that died cannot stop it: it ends now
        with sessions() as s:
            return job_object(s.get(Job, job_id, populate_existing=True), cfg)

    def artifacts_of(s: Any, job_id: str, key: ApiKey) -> tuple[Path, dict[str, Any]]:
        job = own_job(s, job_id, key)
        if job.expired_at is not None:
            raise APIError(410, "artifacts_expired", f"job {job_id}'s files were deleted on "
                           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(job.expired_at))}: the publisher keeps "
                           f"the files of finished jobs for {cfg.retention_days:g} day(s)", "id")
        if job.status != "succeeded":
            raise APIError(409, "job_not_succeeded", f"job {job_id} is {job.status}; artefacts exist only for a "
                           "succeeded (verified) job", "id")
        folder = job_dir(cfg, job_id) / "artifacts"
        return folder, json.loads((folder / MANIFEST).read_text())

    @app.get("/v1/fine-tunes/{job_id}/artifacts", summary="The verified artefacts of a succeeded job")
    def artifacts(job_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
        with sessions() as s:
            _, manifest = artifacts_of(s, job_id, key)
        return {"object": "list", "data": [{"name": n, **m, "url": f"/v1/fine-tunes/{job_id}/artifacts/{n}"}
                                           for n, m in sorted(manifest.items())]}

    @app.get("/v1/fine-tunes/{job_id}/artifacts/{name}", summary="Download one artefact")
    def artifact(job_id: str, name: str, key: ApiKey = Depends(current_key)) -> FileResponse:
        with sessions() as s:
            folder, manifest = artifacts_of(s, job_id, key)
        if name not in manifest:  # only listed names: no path ever comes from the request
            raise APIError(404, "artifact_not_found", f"job {job_id} has no artefact {name!r}; it has "
                           f"{', '.join(sorted(manifest))}", "name")
        return FileResponse(folder / name, filename=name, headers={"X-Content-SHA256": manifest[name]["sha256"]})

    return app
