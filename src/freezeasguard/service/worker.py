"""`freezeasguard worker`: claim queued jobs, fine-tune under the publisher's guard, verify, publish.

One job at a time per process (run several workers for several jobs). A job trains either in this process's
main thread (`processes_per_job` 1) or, for several processes (GPUs), as a torchrun launch of
`service.jobrun` that talks to this worker through files in the job folder. A heartbeat thread renews the
job's lease, records progress and enforces the time limit. When the job is cancelled, times out, or the lease
was lost to another worker, the heartbeat asks the training to stop: in-process by sending this process
SIGINT, which the training loop turns into a checkpoint and a clean stop at the next step boundary; launched,
by a `stop` file that rank 0 turns into the same interrupt on every rank (and, past STOP_GRACE_S, by killing
the launch). A worker killed outright (SIGKILL, power loss) simply stops renewing: once the lease expires the
job is claimable again, and `finetune` resumes it from the last checkpoint in the job's run folder; launched
ranks die with their worker (see `jobrun`). An exclusive file lock on the job folder (released by the kernel
when its holders die; a launch inherits it) keeps a worker that lost its lease but still runs from
overlapping with its successor on the same folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..training import TrainCallback
from ..utils.files import file_sha256
from .config import ServiceConfig, job_dir
from .db import Job, add_event, claim, finish, heartbeat, make_engine, session_factory
from .jobrun import (
    LAUNCH,
    OUTCOME,
    PROGRESS,
    SAMPLES,
    STOP,
    WORKER_PID_ENV,
    check_release,
    error_code,
    error_message,
    processes_for,
    train_job,
)
from .recovery import RECOVER_EVERY_S, job_lock, recover
from .redact import redact

LORA_FILE = "pytorch_lora_weights.safetensors"
MANIFEST = "artifacts.json"  # name -> bytes and SHA-256 of every published file
STOP_GRACE_S = 60.0  # a launched job asked to stop gets this long to finish its step and checkpoint
TRAIN_LOG = "train.log"  # the launched processes' output, for the publisher (never served to users)

log = logging.getLogger(__name__)


def descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (from /proc on Linux; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def visible_gpus(cfg: ServiceConfig) -> int:
    """GPUs a worker's launched jobs can use (0: none, the processes share the CPUs)."""
    if cfg.devices:
        return len([d for d in cfg.devices.split(",") if d.strip()])
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class _Stop(Exception):
    """The job must stop: `reason` is 'cancel', 'lost' (another worker owns it), 'timeout' or 'shutdown'."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Failed(Exception):
    """A launched job's ranks reported a failure with this error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Worker:
    def __init__(self, cfg: ServiceConfig, worker_id: str | None = None) -> None:
        check_release(cfg)  # before anything else: a worker that could not run one job must not start
        self.cfg = cfg
        self.engine = make_engine(cfg.database_url)
        self.sessions = session_factory(self.engine)
        self.guard_digest = file_sha256(cfg.guard)
        gpus = visible_gpus(cfg) if cfg.processes_per_job > 1 else 0
        if gpus and cfg.processes_per_job > gpus:  # one process per GPU: more would fail at their first step
            raise ValueError(f"processes_per_job {cfg.processes_per_job} exceeds the {gpus} GPU(s) this worker sees "
                             f"({'devices ' + repr(cfg.devices) if cfg.devices else 'CUDA_VISIBLE_DEVICES'}); "
                             "lower it or list more devices")
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._stop_reason: str | None = None
        self._training = False
        self._interrupt: Callable[[], None] = self._sigint_self
        self._shutdown = False
        self._swept = float("-inf")
        self._recovered = float("-inf")

    # ------------------------------------------------------------------ loop
    def run(self, *, max_jobs: int | None = None, exit_when_idle: bool = False) -> int:
        """Claim and run jobs until SIGTERM/SIGINT (or `max_jobs`, or an empty queue with exit_when_idle)."""
        from .retention import SWEEP_EVERY_S, sweep_expired

        done = 0
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM,)}
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_term)
        try:
            while not self._shutdown and (max_jobs is None or done < max_jobs):
                if self.cfg.retention_days and time.monotonic() - self._swept >= SWEEP_EVERY_S:
                    self._swept = time.monotonic()
                    sweep_expired(self.cfg, self.sessions)
                if time.monotonic() - self._recovered >= RECOVER_EVERY_S:
                    self._recovered = time.monotonic()
                    try:
                        recover(self.cfg, self.sessions)
                    except Exception:  # noqa: BLE001 - a database hiccup: the next round retries
                        log.exception("worker %s: recovery failed", self.worker_id)
                with self.sessions() as s:
                    job = claim(s, self.worker_id, self.guard_digest, self.cfg.lease_seconds)
                if job is None:
                    if exit_when_idle:
                        break
                    time.sleep(self.cfg.poll_seconds)
                    continue
                self.run_job(job)
                done += 1
        except KeyboardInterrupt:
            pass
        finally:
            if threading.current_thread() is threading.main_thread():
                for s, h in previous.items():
                    signal.signal(s, h)
        return done

    def _sigint_self(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the training loop checkpoints and stops

    def _on_term(self, signum: int, frame: Any) -> None:
        self._shutdown = True
        if self._training:  # stop at the next step boundary, with a checkpoint
            self._stop_reason = self._stop_reason or "shutdown"
            self._interrupt()

    def event(self, job_id: str, message: str, level: str = "info") -> None:
        with self.sessions() as s:
            add_event(s, job_id, redact(message, self.cfg, job_id), level)
            s.commit()

    # ------------------------------------------------------------------ one job
    def run_job(self, job: Job) -> str:
        """Run a claimed job to its end; returns the status it left the job in."""
        folder = job_dir(self.cfg, job.id)
        with job_lock(folder) as lock_fd:
            if lock_fd is None:
                # A worker that lost its lease is still running this job: hand it back; that worker's next
                # heartbeat finds the job no longer its own and stops, and the job is claimed afresh.
                with self.sessions() as s:
                    finish(s, job.id, self.worker_id, "queued")
                return "queued"
            if job.cancel_requested:
                return self._end(job, "cancelled", message="cancelled before it resumed")
            if self._over_time(job):
                return self._stopped(job, "timeout", folder)
            self._stop_reason = None
            try:
                return self._run_locked(job, folder, lock_fd)
            except _Stop as stop:
                return self._stopped(job, stop.reason, folder)
            except KeyboardInterrupt:
                return self._stopped(job, self._stop_reason or "shutdown", folder)
            except _Failed as failed:
                return self._end(job, "failed", error_code=failed.code, error_message=failed.message)
            except Exception as exc:  # noqa: BLE001 - a job's failure must never take the worker down
                return self._end(job, "failed", error_code=error_code(exc), error_message=error_message(exc))

    def _over_time(self, job: Job) -> bool:
        """The publisher's time limit, on the job's running time as users see it (since it first started)."""
        limit = self.cfg.max_job_seconds
        return bool(limit) and job.started_at is not None and time.time() - job.started_at > limit

    def _stopped(self, job: Job, reason: str, folder: Path) -> str:
        shutil.rmtree(folder / "artifacts", ignore_errors=True)
        if reason == "cancel":
            return self._end(job, "cancelled", message="cancelled at a step boundary")
        if reason == "timeout":
            return self._end(job, "failed", error_code="timeout", error_message="the job ran longer than the "
                             f"publisher's limit of {self.cfg.max_job_seconds:g} s; nothing is released")
        if reason == "lost":
            self.event(job.id, f"worker {self.worker_id} lost the job's lease and stopped", "warning")
            return "lost"
        self._shutdown = True  # Ctrl-C or SIGTERM: requeue this job and take no other
        with self.sessions() as s:  # back to the queue, to resume from its checkpoint
            finish(s, job.id, self.worker_id, "queued")
        self.event(job.id, f"worker {self.worker_id} shut down; job requeued")
        return "queued"

    def _end(self, job: Job, status: str, *, message: str | None = None, **values: Any) -> str:
        # Stored as users will see them: no path of this server in an error or a result.
        values = {k: redact(v, self.cfg, job.id) if k in ("error_message", "result") else v for k, v in values.items()}
        with self.sessions() as s:
            ok = finish(s, job.id, self.worker_id, status, **values)
            if not ok and status == "succeeded" and _cancel_requested(s, job.id, self.worker_id):
                # cancelled while it was being verified and published: the user asked for nothing to be released
                shutil.rmtree(job_dir(self.cfg, job.id) / "artifacts", ignore_errors=True)
                status, message, values = "cancelled", "cancelled before the result was released", {}
                ok = finish(s, job.id, self.worker_id, status)
        if ok:
            text = message or values.get("error_message") or status
            self.event(job.id, f"{status}: {text}", "error" if status == "failed" else "info")
            return status
        return "lost"

    def _processes(self, folder: Path, hp: dict[str, Any]) -> int:
        """How many processes train this job. A job that has a checkpoint keeps the count it started with
        (its per-process batch is part of what a resumed run must match), whatever this worker's setting."""
        from ..training import latest_checkpoint
        from ..utils.files import read_json

        if latest_checkpoint(folder / "run") is not None and (folder / LAUNCH).is_file():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return int(read_json(folder / LAUNCH, "job launch record")["processes"])
        return processes_for(int(hp["batch_size"]), self.cfg.processes_per_job)

    def _run_locked(self, job: Job, folder: Path, lock_fd: int) -> str:
        from ..audit import verify
        from ..guard import Guard
        from ..training import latest_checkpoint
        from ..utils.files import atomic_write_json, read_json

        hp = job.hyperparameters
        run_dir = folder / "run"
        processes = self._processes(folder, hp)
        self.event(job.id, f"attempt {job.attempts} started on worker {self.worker_id}"
                   + (f" with {processes} processes" if processes > 1 else ""))
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            self.event(job.id, f"resuming from checkpoint {ckpt.name}")
        # The ranks never touch the database: its URL (credentials, maybe) stays out of the job folder.
        atomic_write_json(folder / LAUNCH, {"config": {**self.cfg.to_dict(), "database": ""}, "hyperparameters": hp,
                                            "processes": processes})
        (run_dir / SAMPLES).unlink(missing_ok=True)
        if processes == 1:
            progress = _Progress()
            with self._heartbeat(job, run_dir, progress.snapshot, self._sigint_self):
                train_job(self.cfg, folder, hp, 1, callbacks=[progress])
        else:
            self._launch(job, folder, processes, lock_fd)
        if self._stop_reason:
            raise _Stop(self._stop_reason)

        # The release keeps the lease (a large model takes a while to verify and copy) but is never interrupted
        # halfway: a cancel or a lost lease found meanwhile is acted on once it is done.
        with self._heartbeat(job, run_dir, lambda: (None, None), lambda: None):
            # The gate: nothing is published unless the written derivative passes the auditor.
            guard = Guard.load(self.cfg.guard)
            derivative = run_dir / "lora" / LORA_FILE if hp["method"] == "lora" else run_dir / "model"
            report = verify(derivative, guard)
            if not report.compliant:
                shutil.rmtree(run_dir / ("lora" if hp["method"] == "lora" else "model"), ignore_errors=True)
                return self._end(job, "failed", error_code="guard_violation",
                                 error_message="the fine-tuned model fails the guard audit; nothing is released: "
                                 + report.describe(limit=5))
            self.event(job.id, f"verify: {report.describe()}")
            record = read_json(run_dir / "finetune.json", "fine-tuning record")
            self._publish(job, folder, run_dir, derivative, report)
        if self._stop_reason in ("cancel", "lost"):
            raise _Stop(self._stop_reason)
        metrics = record["metrics"]
        summary = savings(record, len(guard.frozen))
        summary["resumed_from_step"] = metrics["resumed_from"]
        last = (metrics.get("loss") or {}).get("last")
        return self._end(job, "succeeded", message=f"{hp['steps']} steps, final loss {last:.4f}"
                         if last is not None else None, step=int(hp["steps"]), loss=last,
                         result={"savings": summary, "audit": report.to_dict(), "processes": metrics["world_size"],
                                 "step_time_s": metrics.get("step_time_s"), "device": metrics.get("device")})

    def _publish(self, job: Job, folder: Path, run_dir: Path, derivative: Path, report: Any) -> None:
        from ..utils.files import atomic_directory, atomic_write_json, read_json

        with atomic_directory(folder / "artifacts", overwrite=True) as tmp:
            if derivative.is_file():
                shutil.copy2(derivative, tmp / LORA_FILE)
            else:
                _zip_dir(derivative, tmp / "model.zip")
            # The records name files by this server's paths; users get them relative to the job.
            atomic_write_json(tmp / "finetune.json",
                              redact(read_json(run_dir / "finetune.json", "fine-tuning record"), self.cfg, job.id))
            atomic_write_json(tmp / "verify.json", redact(report.to_dict(), self.cfg, job.id))
            if (run_dir / SAMPLES).is_file():
                shutil.copy2(run_dir / SAMPLES, tmp / SAMPLES)
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            atomic_write_json(tmp / MANIFEST, {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                                               for p in files})

    # ------------------------------------------------------------------ the launched path
    def _launch(self, job: Job, folder: Path, processes: int, lock_fd: int) -> None:
        """Train the job as `processes` torchrun ranks of `service.jobrun`; returns when they are done."""
        from ..utils.files import read_json

        for stale in (folder / STOP, folder / PROGRESS, *folder.glob(OUTCOME.format(rank="*"))):
            stale.unlink(missing_ok=True)
        env = {**os.environ, WORKER_PID_ENV: str(os.getpid())}
        if self.cfg.devices:
            env["CUDA_VISIBLE_DEVICES"] = self.cfg.devices
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "freezeasguard.service.jobrun", str(folder)]
        with open(folder / TRAIN_LOG, "ab") as log:
            # Own session: a Ctrl-C at the worker's terminal reaches the worker, which stops the job cleanly,
            # not torchrun. The lock's descriptor is inherited, so the folder stays locked while torchrun lives.
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, pass_fds=(lock_fd,))
            try:
                with self._heartbeat(job, folder / "run", _ProgressFile(folder).snapshot,
                                     lambda: (folder / STOP).touch()):
                    rc = self._wait(proc, folder)
            finally:
                if proc.poll() is None:
                    _kill(proc)
        if self._stop_reason:
            return
        outcomes = {int(p.name.split(".")[1]): read_json(p, "rank outcome")
                    for p in folder.glob(OUTCOME.format(rank="*"))}
        for rank in sorted(outcomes):
            if outcomes[rank].get("status") == "failed":
                raise _Failed(outcomes[rank].get("code", "internal_error"),
                              outcomes[rank].get("message", "training failed"))
        if outcomes.get(0, {}).get("status") == "stopped":  # interrupted from outside the worker: requeue
            raise _Stop("shutdown")
        if rc != 0 or 0 not in outcomes:
            tail = (folder / TRAIN_LOG).read_bytes()[-4000:].decode("utf-8", "replace")
            log.error("worker %s: job %s: training processes exited with code %s:\n%s", self.worker_id, job.id, rc,
                      tail)
            raise RuntimeError(f"the training processes exited with code {rc} without a result")

    def _wait(self, proc: subprocess.Popen, folder: Path) -> int:
        """Wait for the launch; once the job must stop, give it STOP_GRACE_S to checkpoint, then kill it."""
        deadline: float | None = None
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:  # Ctrl-C (or SIGINT) at the worker: requeue; a second one kills
                if deadline is not None:
                    _kill(proc)
                    return proc.wait()
                self._stop_reason = self._stop_reason or "shutdown"
                (folder / STOP).touch()
            if self._stop_reason and deadline is None:
                deadline = time.monotonic() + STOP_GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                _kill(proc)
                return proc.wait()

    # ------------------------------------------------------------------ heartbeat
    @contextlib.contextmanager
    def _heartbeat(self, job: Job, run_dir: Path, progress: Callable[[], tuple[int | None, float | None]],
                   interrupt: Callable[[], None]) -> Iterator[None]:
        stop = threading.Event()
        seen = {"ckpt": _checkpoint_step(run_dir)}

        def beat() -> None:
            with self.sessions() as s:
                while not stop.wait(self.cfg.heartbeat_seconds):
                    step, loss = progress()
                    try:
                        ours, cancel = heartbeat(s, job.id, self.worker_id, self.cfg.lease_seconds,
                                                 step=step, loss=loss)
                        ckpt = _checkpoint_step(run_dir)
                        if ckpt > seen["ckpt"]:
                            seen["ckpt"] = ckpt
                            shown = "" if loss is None else f": loss {loss:.4f}"
                            add_event(s, job.id, f"step {step}/{job.total_steps}{shown}; checkpoint at step {ckpt}")
                            s.commit()
                    except Exception:  # noqa: BLE001 - a database hiccup: retry at the next beat
                        s.rollback()
                        continue
                    reason = ("lost" if not ours else "cancel" if cancel else
                              "timeout" if self._over_time(job) else None)
                    if reason and self._stop_reason is None:
                        self._stop_reason = reason
                        if self._training:
                            interrupt()

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        self._interrupt = interrupt
        self._training = True
        thread.start()
        try:
            yield
        finally:
            self._training = False
            self._interrupt = self._sigint_self
            stop.set()
            thread.join()


def _kill(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End a launch: SIGTERM to torchrun (which stops its ranks), then, after `grace` seconds, SIGKILL to it and
    every descendant it had (the ranks run in sessions of their own, so no process-group signal reaches them)."""
    kids = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *kids]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


class _ProgressFile:
    """Step and loss of a launched job, as its rank 0 last wrote them."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / PROGRESS

    def snapshot(self) -> tuple[int | None, float | None]:
        import json

        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None, None
        return data.get("step"), data.get("loss")


class _Progress(TrainCallback):
    """Step and loss of the running job, read by the heartbeat thread (plain attribute writes)."""

    name = "service-progress"

    def __init__(self) -> None:
        self.step: int | None = None
        self.loss: float | None = None

    def on_train_start(self, ctx: Any) -> None:
        self.step, self.loss = ctx.step, ctx.loss

    def on_step_end(self, ctx: Any) -> None:
        self.step, self.loss = ctx.step, ctx.loss

    def snapshot(self) -> tuple[int | None, float | None]:
        return self.step, self.loss


def _cancel_requested(s: Any, job_id: str, worker_id: str) -> bool:
    from sqlalchemy import select

    return s.scalar(select(Job.cancel_requested).where(Job.id == job_id, Job.worker_id == worker_id,
                                                       Job.status == "running")) is True


def _checkpoint_step(run_dir: Path) -> int:
    from ..training import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    return int(ckpt.name.split("-")[-1]) if ckpt is not None else 0


def _zip_dir(src: Path, dest: Path) -> None:
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())


def savings(record: dict[str, Any], frozen_tensors: int) -> dict[str, Any]:
    """What the guarded path saved against full fine-tuning, from the figures `finetune` measured.

    Full fine-tuning would train every UNet parameter; its optimizer state is this run's bytes per trainable
    parameter times the UNet's parameters, and its extra gradient memory 4 bytes per extra parameter: both
    are estimates by scaling, labelled as such; the run's own figures are measured.
    """
    m = record["metrics"]
    # every trained tensor (the service never trains the text encoder), against every UNet parameter
    trainable, unet = int(record["trainable_parameters"]), int(record["unet"]["parameters"])
    opt = int(m.get("optimizer_state_bytes") or 0)
    full_opt = round(opt / trainable * unet) if trainable else None
    peak = m.get("peak_memory_bytes")
    full_peak = (peak + (full_opt - opt) + 4 * (unet - trainable)) if (peak is not None and full_opt is not None) else None
    return {
        "trainable_parameters": trainable,
        "full_finetune_parameters": unet,
        "trainable_fraction": trainable / unet if unet else None,
        "frozen_tensors": frozen_tensors,
        "optimizer_state_bytes": opt,
        "full_finetune_optimizer_state_bytes_estimate": full_opt,
        "peak_memory_bytes": peak,
        "peak_memory_kind": m.get("peak_memory_kind"),
        "full_finetune_peak_memory_bytes_estimate": full_peak,
        "lora_modules": len(record.get("lora_modules") or []),
        "skipped_frozen_modules": len(record.get("skipped_modules") or []),
    }
