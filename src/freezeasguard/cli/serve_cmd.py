"""`freezeasguard serve`, `worker` and `keys`: the publisher's fine-tuning service (needs the 'serve' extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from . import _fail, _offline, app
from .options import DebugOpt, JsonOpt

keys_app = typer.Typer(help="Create, list and revoke the service's API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="The service's folder: database (SQLite), "
                                                 "uploads, job runs and artefacts; serve writes its config there as "
                                                 "service.json. Default: the config's, else ./service-data.")]
ServeModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="'embedded' (the shipped tiny default) or a "
                                                   "Stable-Diffusion-format model directory. Default: the config's, "
                                                   "else embedded.")]
DbOpt = Annotated[str | None, typer.Option("--db", help="SQLAlchemy database URL (e.g. postgresql://...); "
                                           "default: SQLite at <data-dir>/service.db.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="ServiceConfig JSON (limits, quotas, lease); "
                                                "options given here override it.")]


def _require_extra() -> None:
    from ..service import require_serve_extra

    try:
        require_serve_extra()
    except ImportError as exc:
        raise _fail(exc) from exc


def _config(config: Path | None, data_dir: Path | None, **overrides):  # type: ignore[no-untyped-def]
    from ..service.config import resolve_config

    try:
        return resolve_config(config, data_dir=str(data_dir) if data_dir is not None else None, **overrides)
    except ValueError as exc:
        raise _fail(exc) from exc


@app.command()
def serve(
    guard: Annotated[Path | None, typer.Option("--guard", "-g", help="The guard every job runs under.")] = None,
    model: ServeModelOpt = None,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    max_job_seconds: Annotated[float | None, typer.Option(help="A job running longer fails with error code "
                                                          "'timeout', nothing released (0: no limit). Default: "
                                                          "the config's, else 86400.")] = None,
    retention_days: Annotated[float | None, typer.Option(help="Delete the upload, run and artefacts of jobs "
                                                         "finished this many days ago; the job stays listed and "
                                                         "its artefacts answer 410 (0: keep forever). Default: "
                                                         "the config's, else 0.")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    debug: DebugOpt = False,
) -> None:
    """Run the guarded fine-tuning HTTP API (OpenAPI docs at /docs). Start workers with `freezeasguard worker`."""
    _offline()
    _require_extra()
    import uvicorn

    from ..service.api import create_app
    from ..service.config import CONFIG_NAME
    from ..utils.files import atomic_write_json

    cfg = _config(config, data_dir, guard=str(guard) if guard else None, model=model, database=db,
                  max_job_seconds=max_job_seconds, retention_days=retention_days)
    # Absolute paths in service.json, so a worker started from any folder finds the same files.
    cfg.data_dir, cfg.guard = str(cfg.root), str(Path(cfg.guard).resolve())
    if cfg.model != "embedded":
        cfg.model = str(Path(cfg.model).resolve())
    try:
        application = create_app(cfg)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from exc
    atomic_write_json(cfg.root / CONFIG_NAME, cfg.to_dict())  # what `freezeasguard worker --data-dir` reads
    typer.echo(f"serving {cfg.model} under guard {cfg.guard} on http://{host}:{port} (docs: /docs); "
               f"start workers with: freezeasguard worker --data-dir {cfg.root}")
    uvicorn.run(application, host=host, port=port, log_level=log_level)


@app.command()
def worker(
    data_dir: DataDirOpt = None,
    guard: Annotated[Path | None, typer.Option("--guard", "-g", help="The guard (default: the one `serve` "
                                               "recorded in <data-dir>/service.json).")] = None,
    model: ServeModelOpt = None,
    config: ConfigOpt = None,
    db: DbOpt = None,
    processes_per_job: Annotated[int | None, typer.Option(help="Processes (one per GPU) that train each job, "
                                                          "launched with torchrun; the job's batch is split "
                                                          "over them. Default: the config's, else 1 (in the "
                                                          "worker's own process).")] = None,
    devices: Annotated[str | None, typer.Option(help="CUDA_VISIBLE_DEVICES for this worker's launched jobs, "
                                                "e.g. '0,1' (default: inherited).")] = None,
    max_jobs: Annotated[int | None, typer.Option(help="Exit after this many jobs.")] = None,
    exit_when_idle: Annotated[bool, typer.Option(help="Exit when no job is waiting.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Claim queued jobs and run them (fine-tune under the guard, verify, publish); SIGTERM requeues the
    current job at its next step boundary. Workers also delete expired jobs' files (retention_days)."""
    _offline()
    _require_extra()
    from ..service.config import CONFIG_NAME
    from ..service.worker import Worker

    if config is None:
        data_dir = data_dir or Path("service-data")
    if config is None and guard is None and not (data_dir / CONFIG_NAME).is_file():
        raise _fail(ValueError(f"{data_dir / CONFIG_NAME}: no service config; start `freezeasguard serve "
                               f"--data-dir {data_dir}` first (it writes one), or pass --guard or --config"))
    cfg = _config(config, data_dir, guard=str(guard) if guard else None, model=model, database=db,
                  processes_per_job=processes_per_job, devices=devices)
    try:
        w = Worker(cfg)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(f"worker {w.worker_id}: jobs of guard {w.guard_digest[:12]} from {cfg.database_url}")
    n = w.run(max_jobs=max_jobs, exit_when_idle=exit_when_idle)
    typer.echo(f"worker {w.worker_id}: ran {n} job(s)")


def _service(data_dir: Path | None, db: str | None, config: Path | None):  # type: ignore[no-untyped-def]
    """(config, session factory) of the service whose keys are managed."""
    _require_extra()
    data_dir = data_dir or Path("service-data")
    from ..service.config import CONFIG_NAME, ServiceConfig
    from ..service.db import make_engine, session_factory

    try:
        if config is not None:
            cfg = ServiceConfig.load(config)
        elif (data_dir / CONFIG_NAME).is_file():
            cfg = ServiceConfig.load(data_dir / CONFIG_NAME)
        else:
            cfg = ServiceConfig(data_dir=str(data_dir))
    except ValueError as exc:
        raise _fail(exc) from exc
    if db:
        cfg.database = db
    cfg.root.mkdir(parents=True, exist_ok=True)
    return cfg, session_factory(make_engine(cfg.database_url))


def _sessions(data_dir: Path | None, db: str | None, config: Path | None):  # type: ignore[no-untyped-def]
    return _service(data_dir, db, config)[1]


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who the key is for (shown in listings).")],
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    max_concurrent_jobs: Annotated[int | None, typer.Option(help="This key's concurrent-job quota (default: the service's).")] = None,
    max_steps_per_day: Annotated[int | None, typer.Option(help="This key's steps per 24 h (default: the service's).")] = None,
    debug: DebugOpt = False,
) -> None:
    """Create an API key; the secret is printed once (only its hash is stored)."""
    from ..service.db import create_key

    for opt, v in (("--max-concurrent-jobs", max_concurrent_jobs), ("--max-steps-per-day", max_steps_per_day)):
        if v is not None and v < 1:
            raise _fail(ValueError(f"{opt} must be >= 1, got {v}"))
    with _sessions(data_dir, db, config)() as s:
        key, secret = create_key(s, name, max_concurrent_jobs=max_concurrent_jobs, max_steps_per_day=max_steps_per_day)
    typer.echo(secret)
    typer.echo(f"created {key.id} for {name!r}; the key above is shown only now", err=True)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_..., see `keys list`).")],
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Revoke an API key: its requests get 401 from now on and its unfinished jobs are cancelled (a running one
    at its next step); its finished jobs and artefacts are kept."""
    from ..service.db import revoke_key
    from ..service.recovery import recover

    cfg, sessions = _service(data_dir, db, config)
    with sessions() as s:
        try:
            _, jobs = revoke_key(s, key_id)
        except KeyError as exc:
            raise _fail(ValueError(exc.args[0])) from exc
    recover(cfg, sessions, key_id=key_id)  # jobs whose holder died cannot stop themselves
    typer.echo(f"revoked {key_id}" + (f"; cancelled its {len(jobs)} unfinished job(s)" if jobs else ""))


@keys_app.command("list")
def keys_list(
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List API keys (ids, names, state; never secrets)."""
    from sqlalchemy import select

    from ..service.db import ApiKey

    with _sessions(data_dir, db, config)() as s:
        keys = s.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
        rows = [{"id": k.id, "name": k.name, "created_at": k.created_at, "revoked": k.revoked_at is not None,
                 "max_concurrent_jobs": k.max_concurrent_jobs, "max_steps_per_day": k.max_steps_per_day} for k in keys]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['id']}  {'revoked' if r['revoked'] else 'active ':7}  {r['name']}")
