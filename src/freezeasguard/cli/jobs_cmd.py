"""`freezeasguard jobs`: submit a dataset to the fine-tuning service, follow the job, download the result."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from . import _fail, app
from .options import DebugOpt, JsonOpt, OverwriteOpt, finite_positive

jobs_app = typer.Typer(help="Use a publisher's fine-tuning service: submit, status, download, cancel.",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

UrlOpt = Annotated[str | None, typer.Option("--url", help="Service URL (default: $FREEZEASGUARD_URL or "
                                            "http://127.0.0.1:8000).")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", help="API key (default: $FREEZEASGUARD_API_KEY).")]
JobArg = Annotated[str, typer.Argument(help="Job id (ftjob-...).")]


def _client(url: str | None, api_key: str | None):  # type: ignore[no-untyped-def]
    try:
        from ..service.client import Client

        return Client(url, api_key or os.environ.get("FREEZEASGUARD_API_KEY"))
    except ImportError as exc:
        raise _fail(ImportError(f"the client needs httpx: pip install 'freezeasguard[client]' ({exc})")) from exc


def _call(fn, *args: Any, **kwargs: Any) -> Any:  # type: ignore[no-untyped-def]
    from ..errors import FreezeAsGuardError

    try:
        return fn(*args, **kwargs)
    except FreezeAsGuardError as exc:
        raise _fail(exc) from exc


def _describe(job: dict[str, Any]) -> str:
    line = f"{job['id']}  {job['status']}  step {job['step']}/{job['total_steps']}"
    if job.get("loss") is not None:
        line += f"  loss {job['loss']:.4f}"
    if job.get("error"):
        line += f"\n  error {job['error']['code']}: {job['error']['message']}"
    s = (job.get("result") or {}).get("savings")
    if s:
        line += (f"\n  trained {s['trainable_parameters']:,} of {s['full_finetune_parameters']:,} UNet parameters "
                 f"({s['trainable_fraction']:.1%}); optimizer state {s['optimizer_state_bytes']:,} B "
                 f"(full fine-tuning: ~{s['full_finetune_optimizer_state_bytes_estimate']:,} B)")
    if job.get("expired_at") is not None:
        line += f"\n  files deleted {_utc(job['expired_at'])} (the publisher's retention period)"
    elif job.get("expires_at") is not None:
        line += f"\n  files kept until {_utc(job['expires_at'])}"
    return line


def _utc(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


@jobs_app.command("submit")
def submit(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Image-caption folder (metadata.jsonl/.csv or .txt sidecars) or a zip of one.")],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    method: Annotated[str | None, typer.Option(help="'full' or 'lora' (default: the publisher's).")] = None,
    # Typed like `finetune`'s options; only the ones given are sent, the rest take the publisher's defaults.
    steps: Annotated[int, typer.Option(help="Optimizer steps (default: the publisher's).", min=1,
                                       show_default=False)] = 200,
    batch_size: Annotated[int, typer.Option(help="Micro-batch (default: the publisher's).", min=1,
                                            show_default=False)] = 4,
    lr: Annotated[float, typer.Option(help="Learning rate (default: the publisher's).", callback=finite_positive,
                                      show_default=False)] = 1e-4,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank (default: the publisher's).", min=1,
                                           show_default=False)] = 4,
    seed: Annotated[int, typer.Option(help="Seed of data order and noise (default 0).", min=0)] = 0,
    wait: Annotated[bool, typer.Option(help="Wait for the job to finish (exit 1 unless it succeeded).")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Upload a dataset and queue a guarded fine-tuning job; prints the job id."""
    def given(name: str, value: Any) -> Any:
        source = ctx.get_parameter_source(name)
        return value if source is not None and source.name != "DEFAULT" else None

    with _client(url, api_key) as c:
        job = _call(c.submit, data, method=method, steps=given("steps", steps),
                    batch_size=given("batch_size", batch_size), learning_rate=given("lr", lr),
                    lora_rank=given("lora_rank", lora_rank), seed=given("seed", seed))
        if wait:
            job = _call(c.wait, job["id"])
    typer.echo(json.dumps(job, indent=2) if as_json else (job["id"] if not wait else _describe(job)))
    if wait and job["status"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("status")
def status(
    job_id: JobArg,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    wait: Annotated[bool, typer.Option(help="Poll until the job finishes.")] = False,
    events: Annotated[bool, typer.Option(help="Also print the job's events.")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """A job's status, progress, loss and (when finished) savings or error."""
    with _client(url, api_key) as c:
        job = _call(c.wait, job_id) if wait else _call(c.status, job_id)
        evs = _call(c.events, job_id) if events else []
    if as_json:
        typer.echo(json.dumps({**job, **({"events": evs} if events else {})}, indent=2))
        return
    typer.echo(_describe(job))
    for e in evs:
        typer.echo(f"  [{e['level']}] {e['message']}")


@jobs_app.command("download")
def download(
    job_id: JobArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the artefacts into.")],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Download a succeeded job's verified artefacts (LoRA or model.zip, finetune.json, verify.json, samples.png).
    Files of the same names already in OUT are not replaced unless --overwrite (nothing is fetched then)."""
    with _client(url, api_key) as c:
        try:
            files = _call(c.download, job_id, out, overwrite=overwrite)
        except FileExistsError as exc:
            raise _fail(exc) from exc
    for f in files:
        typer.echo(f"wrote {f}")


@jobs_app.command("cancel")
def cancel(job_id: JobArg, url: UrlOpt = None, api_key: KeyOpt = None, debug: DebugOpt = False) -> None:
    """Cancel a job; a running job stops at its next step boundary."""
    with _client(url, api_key) as c:
        typer.echo(_describe(_call(c.cancel, job_id)))


@jobs_app.command("list")
def list_jobs(url: UrlOpt = None, api_key: KeyOpt = None, debug: DebugOpt = False) -> None:
    """This key's jobs, newest first."""
    with _client(url, api_key) as c:
        for job in _call(c.list):
            typer.echo(_describe(job).splitlines()[0])
