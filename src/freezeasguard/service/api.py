"""The HTTP API (FastAPI): jobs, events, cancellation, artefacts and the released model, per API key.

Conventions follow the hosted fine-tuning APIs: a job object with `status` (validating_files -> queued ->
running -> succeeded | failed | cancelled), a `hyperparameters` object, an events list and an `error`
object with `code` and `message`. Every error response is `{"error": {"code", "message", "param"}}`.
Training never runs here: the API only validates uploads and reads and writes rows, so it keeps answering
while workers train.
"""

from __future__ import annotations

import json
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
from .retention import expiry_time, sweep_expired
from .uploads import UploadError, extract_upload
from .worker import MANIFEST

HYPERPARAMETERS = ("method", "steps", "batch_size", "learning_rate", "lora_rank", "seed")
PUBLISHER_FIXED = ("model", "guard", "lora_targets", "lora_target", "target_modules", "base_model")
_FORM_SLACK = 64 << 10  # multipart framing and the small fields, on top of the archive itself


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
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "result": job.result,
        # retention: when the job's files (upload, artefacts) are deleted, and when they were
        "expires_at": expiry_time(cfg, finished),
        "expired_at": job.expired_at,
    }


def sweep_stale_validations(cfg: ServiceConfig, sessions: Any, older_than_s: float = 600.0) -> int:
    """Remove submissions an API process died while validating (validation takes seconds, not minutes), so
    they neither linger nor count against a key's quota."""
    with sessions() as s:
        stale = s.scalars(select(Job.id).where(Job.status == "validating_files",
                                               Job.created_at < time.time() - older_than_s)).all()
        for job_id in stale:
            shutil.rmtree(job_dir(cfg, job_id), ignore_errors=True)
            s.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
            s.execute(delete(Job).where(Job.id == job_id))
        s.commit()
    return len(stale)


def create_app(cfg: ServiceConfig) -> FastAPI:
    from ..guard import Guard

    cfg.root.mkdir(parents=True, exist_ok=True)
    engine = make_engine(cfg.database_url)
    sessions = session_factory(engine)
    guard = Guard.load(cfg.guard)
    guard_digest = file_sha256(cfg.guard)
    sweep_stale_validations(cfg, sessions)
    sweep_expired(cfg, sessions)
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
            "limits": {k: getattr(cfg, k) for k in ("max_steps", "max_batch_size", "min_learning_rate",
                                                    "max_learning_rate", "max_lora_rank", "max_upload_bytes",
                                                    "max_uncompressed_bytes", "max_files", "max_image_pixels")},
            "quotas": {"max_concurrent_jobs": key.max_concurrent_jobs or cfg.max_concurrent_jobs,
                       "max_steps_per_day": key.max_steps_per_day or cfg.max_steps_per_day},
            "defaults": {"method": cfg.default_method, "steps": cfg.default_steps, "batch_size": cfg.default_batch_size,
                         "learning_rate": cfg.default_learning_rate, "lora_rank": cfg.default_lora_rank, "seed": 0},
            **({"notes": cfg.extra} if cfg.extra else {}),
        }]}

    def hyperparameters(fields: dict[str, str]) -> dict[str, Any]:
        for name in fields:
            if name in PUBLISHER_FIXED:
                raise APIError(400, "publisher_fixed", f"{name}: the publisher fixes the base model, the guard and "
                               "the LoRA targets; they cannot be chosen per job", name)
            if name not in HYPERPARAMETERS:
                raise APIError(400, "unknown_parameter", f"{name}: unknown field; the hyperparameters are "
                               f"{', '.join(HYPERPARAMETERS)}", name)

        def number(name: str, kind: type, default: Any, lo: Any, hi: Any) -> Any:
            raw = fields.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise APIError(400, "invalid_hyperparameters", f"{name}: expected {kind.__name__}, got {raw!r}",
                               name) from None
            if not lo <= value <= hi:
                raise APIError(400, "invalid_hyperparameters", f"{name}: {value} is outside the publisher's limits "
                               f"[{lo}, {hi}]", name)
            return value

        method = fields.get("method") or cfg.default_method
        if method not in cfg.methods:
            raise APIError(400, "invalid_hyperparameters", f"method: {method!r} is not offered; choose one of "
                           f"{list(cfg.methods)}", "method")
        return {
            "method": method,
            "steps": number("steps", int, cfg.default_steps, 1, cfg.max_steps),
            "batch_size": number("batch_size", int, cfg.default_batch_size, 1, cfg.max_batch_size),
            "learning_rate": number("learning_rate", float, cfg.default_learning_rate, cfg.min_learning_rate,
                                    cfg.max_learning_rate),
            "lora_rank": number("lora_rank", int, cfg.default_lora_rank, 1, cfg.max_lora_rank),
            "seed": number("seed", int, 0, 0, 2**31 - 1),
        }

    def submit(key: ApiKey, hp: dict[str, Any], upload: Any, filename: str) -> dict[str, Any]:
        job_id = "ftjob-" + secrets.token_hex(12)
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
        folder = job_dir(cfg, job_id)
        try:
            checked = extract_upload(upload, folder / "data", cfg)
        except BaseException as exc:
            shutil.rmtree(folder, ignore_errors=True)
            with sessions() as s:
                s.execute(delete(Job).where(Job.id == job_id))
                s.commit()
            if isinstance(exc, UploadError):
                raise APIError(exc.status, "invalid_training_file", str(exc), "file") from exc
            raise
        with sessions() as s:
            s.execute(update(Job).where(Job.id == job_id).values(
                status="queued", training_files={"filename": filename, "images": checked.images,
                                                 "files": checked.files, "bytes": checked.uncompressed_bytes}))
            add_event(s, job_id, f"validated {filename}: {checked.images} image(s); queued")
            s.commit()
            return job_object(s.get(Job, job_id, populate_existing=True), cfg)

    upload_schema = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "zip of an image-caption folder (metadata.jsonl/.csv or .txt sidecars)"},
            "method": {"type": "string", "enum": list(cfg.methods), "default": cfg.default_method},
            "steps": {"type": "integer", "minimum": 1, "maximum": cfg.max_steps, "default": cfg.default_steps},
            "batch_size": {"type": "integer", "minimum": 1, "maximum": cfg.max_batch_size,
                           "default": cfg.default_batch_size},
            "learning_rate": {"type": "number", "minimum": cfg.min_learning_rate, "maximum": cfg.max_learning_rate,
                              "default": cfg.default_learning_rate},
            "lora_rank": {"type": "integer", "minimum": 1, "maximum": cfg.max_lora_rank,
                          "default": cfg.default_lora_rank},
            "seed": {"type": "integer", "minimum": 0, "default": 0},
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
            form = await Request(request.scope, counted).form(max_files=1, max_fields=len(HYPERPARAMETERS) + 8)
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
                                                "level": e.level, "message": e.message} for e in rows]}

    @app.post("/v1/fine-tunes/{job_id}/cancel", summary="Cancel a job (a running one stops at its next step)")
    def cancel(job_id: str, key: ApiKey = Depends(current_key)) -> dict[str, Any]:
        with sessions() as s:
            job = own_job(s, job_id, key)
            if job.status in TERMINAL:
                raise APIError(409, "job_finished", f"job {job_id} is already {job.status}", "id")
            now = time.time()
            # Queued: cancelled at once. Running: flagged; its worker stops at the next step boundary.
            done = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                             .values(status="cancelled", cancel_requested=True, finished_at=now)).rowcount
            if not done:
                s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL))
                          .values(cancel_requested=True))
            add_event(s, job_id, "cancelled" if done else "cancellation requested")
            s.commit()
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
