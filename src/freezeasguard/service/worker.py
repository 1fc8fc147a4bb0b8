"""`freezeasguard worker`: claim queued jobs, fine-tune under the publisher's guard, verify, publish.

One job at a time per process (run several workers for several jobs). The training runs in this process's
main thread; a heartbeat thread renews the job's lease and records progress. When the job is cancelled, or
the lease was lost to another worker, the heartbeat thread sends this process SIGINT, which the training
loop turns into a checkpoint and a clean stop at the next step boundary. A worker killed outright (SIGKILL,
power loss) simply stops renewing: once the lease expires the job is claimable again, and `finetune`
resumes it from the last checkpoint in the job's run folder. An exclusive file lock on the job folder
(released by the kernel when a process dies) keeps a worker that lost its lease but still runs from
overlapping with its successor on the same folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..training import TrainCallback
from .config import ServiceConfig
from .db import Job, add_event, claim, finish, heartbeat, make_engine, session_factory

LORA_FILE = "pytorch_lora_weights.safetensors"
MANIFEST = "artifacts.json"  # name -> bytes and SHA-256 of every published file


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def job_dir(cfg: ServiceConfig, job_id: str) -> Path:
    return cfg.root / "jobs" / job_id


def load_base_model(model: str):  # type: ignore[no-untyped-def]
    from ..model import DiffusionModel
    from ..zoo import EMBEDDED, load_base

    return load_base() if model == EMBEDDED else DiffusionModel.from_pretrained(Path(model))


@contextlib.contextmanager
def job_lock(folder: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on a job folder: yields False when another live process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except ImportError:  # no fcntl (Windows): the lease alone guards the job
            pass
        yield True
    finally:
        os.close(fd)


class _Stop(Exception):
    """The job must stop: `reason` is 'cancel', 'lost' (another worker owns it) or 'shutdown'."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Worker:
    def __init__(self, cfg: ServiceConfig, worker_id: str | None = None) -> None:
        self.cfg = cfg
        self.engine = make_engine(cfg.database_url)
        self.sessions = session_factory(self.engine)
        self.guard_digest = file_sha256(cfg.guard)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._stop_reason: str | None = None
        self._training = False
        self._shutdown = False

    # ------------------------------------------------------------------ loop
    def run(self, *, max_jobs: int | None = None, exit_when_idle: bool = False) -> int:
        """Claim and run jobs until SIGTERM/SIGINT (or `max_jobs`, or an empty queue with exit_when_idle)."""
        done = 0
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM,)}
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_term)
        try:
            while not self._shutdown and (max_jobs is None or done < max_jobs):
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

    def _on_term(self, signum: int, frame: Any) -> None:
        self._shutdown = True
        if self._training:  # stop at the next step boundary, with a checkpoint
            self._stop_reason = self._stop_reason or "shutdown"
            os.kill(os.getpid(), signal.SIGINT)

    def event(self, job_id: str, message: str, level: str = "info") -> None:
        with self.sessions() as s:
            add_event(s, job_id, message, level)
            s.commit()

    # ------------------------------------------------------------------ one job
    def run_job(self, job: Job) -> str:
        """Run a claimed job to its end; returns the status it left the job in."""
        folder = job_dir(self.cfg, job.id)
        with job_lock(folder) as locked:
            if not locked:
                # A worker that lost its lease is still running this job: hand it back; that worker's next
                # heartbeat finds the job no longer its own and stops, and the job is claimed afresh.
                with self.sessions() as s:
                    finish(s, job.id, self.worker_id, "queued")
                return "queued"
            if job.cancel_requested:
                return self._end(job, "cancelled", message="cancelled before it resumed")
            self._stop_reason = None
            try:
                return self._run_locked(job, folder)
            except _Stop as stop:
                return self._stopped(job, stop.reason, folder)
            except KeyboardInterrupt:
                return self._stopped(job, self._stop_reason or "shutdown", folder)
            except Exception as exc:  # noqa: BLE001 - a job's failure must never take the worker down
                from ..errors import DataError, FreezeAsGuardError
                from ..finetuning import GuardViolation

                code = ("guard_violation" if isinstance(exc, GuardViolation) else
                        "training_diverged" if isinstance(exc, FloatingPointError) else
                        "invalid_training_data" if isinstance(exc, DataError) else
                        # the publisher's side: guard and model do not match, unreadable model or checkpoint
                        "service_error" if isinstance(exc, FreezeAsGuardError) else "internal_error")
                return self._end(job, "failed", error_code=code, error_message=f"{type(exc).__name__}: {exc}"
                                 if code == "internal_error" else str(exc))

    def _stopped(self, job: Job, reason: str, folder: Path) -> str:
        shutil.rmtree(folder / "artifacts", ignore_errors=True)
        if reason == "cancel":
            return self._end(job, "cancelled", message="cancelled at a step boundary")
        if reason == "lost":
            self.event(job.id, f"worker {self.worker_id} lost the job's lease and stopped", "warning")
            return "lost"
        self._shutdown = True  # Ctrl-C or SIGTERM: requeue this job and take no other
        with self.sessions() as s:  # back to the queue, to resume from its checkpoint
            finish(s, job.id, self.worker_id, "queued")
        self.event(job.id, f"worker {self.worker_id} shut down; job requeued")
        return "queued"

    def _end(self, job: Job, status: str, *, message: str | None = None, **values: Any) -> str:
        with self.sessions() as s:
            ok = finish(s, job.id, self.worker_id, status, **values)
        if ok:
            text = message or values.get("error_message") or status
            self.event(job.id, f"{status}: {text}", "error" if status == "failed" else "info")
            return status
        return "lost"

    def _run_locked(self, job: Job, folder: Path) -> str:
        from ..audit import verify
        from ..data import ImageCaptionFolder, ImageTransform
        from ..finetuning import FinetuneConfig, finetune
        from ..guard import Guard
        from ..training import TrainConfig, latest_checkpoint

        hp = job.hyperparameters
        run_dir = folder / "run"
        self.event(job.id, f"attempt {job.attempts} started on worker {self.worker_id}")
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            self.event(job.id, f"resuming from checkpoint {ckpt.name}")
        guard = Guard.load(self.cfg.guard)
        model = load_base_model(self.cfg.model)
        data = ImageCaptionFolder(folder / "data", ImageTransform(model.resolution))
        config = FinetuneConfig(
            method=hp["method"], lora_rank=int(hp["lora_rank"]),
            train=TrainConfig(max_steps=int(hp["steps"]), batch_size=int(hp["batch_size"]),
                              learning_rate=float(hp["learning_rate"]), seed=int(hp["seed"]),
                              checkpoint_every=self.cfg.checkpoint_every, progress=False),
        )
        progress = _Progress()
        with self._heartbeat(job, run_dir, progress):
            result = finetune(model, data, guard=guard, config=config, output_dir=run_dir, callbacks=[progress])
        if self._stop_reason:
            raise _Stop(self._stop_reason)

        # The gate: nothing is published unless the written derivative passes the auditor.
        derivative = run_dir / "lora" / LORA_FILE if hp["method"] == "lora" else run_dir / "model"
        report = verify(derivative, guard)
        if not report.compliant:
            shutil.rmtree(run_dir / ("lora" if hp["method"] == "lora" else "model"), ignore_errors=True)
            return self._end(job, "failed", error_code="guard_violation",
                             error_message="the fine-tuned model fails the guard audit; nothing is released: "
                             + report.describe(limit=5))
        self.event(job.id, f"verify: {report.describe()}")
        record = result.record()
        self._publish(job, folder, run_dir, derivative, model, data, report, record)
        metrics = record["metrics"]
        summary = savings(record, len(guard.frozen))
        summary["resumed_from_step"] = result.train.resumed_from
        losses = result.train.losses
        return self._end(job, "succeeded", message=f"{hp['steps']} steps, final loss {losses[-1]:.4f}" if losses else None,
                         step=int(hp["steps"]), loss=losses[-1] if losses else None,
                         result={"savings": summary, "audit": report.to_dict(),
                                 "step_time_s": metrics.get("step_time_s"), "device": metrics.get("device")})

    def _publish(self, job: Job, folder: Path, run_dir: Path, derivative: Path, model: Any, data: Any,
                 report: Any, record: dict[str, Any]) -> None:
        from ..images import save_grid
        from ..io import atomic_directory, atomic_write_json

        with atomic_directory(folder / "artifacts", overwrite=True) as tmp:
            if derivative.is_file():
                shutil.copy2(derivative, tmp / LORA_FILE)
            else:
                _zip_dir(derivative, tmp / "model.zip")
            shutil.copy2(run_dir / "finetune.json", tmp / "finetune.json")
            atomic_write_json(tmp / "verify.json", report.to_dict())
            n = min(self.cfg.sample_images, len(data))
            if n:
                import torch

                with torch.no_grad():
                    images = model.sample(list(data.captions[:n]), seed=int(job.hyperparameters["seed"]),
                                          num_inference_steps=self.cfg.sample_steps)
                save_grid(images, tmp / "samples.png", nrow=n, scale=max(1, 128 // model.resolution))
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            atomic_write_json(tmp / MANIFEST, {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                                               for p in files})

    @contextlib.contextmanager
    def _heartbeat(self, job: Job, run_dir: Path, progress: Any) -> Iterator[None]:
        stop = threading.Event()
        seen = {"ckpt": _checkpoint_step(run_dir)}

        def beat() -> None:
            with self.sessions() as s:
                while not stop.wait(self.cfg.heartbeat_seconds):
                    try:
                        ours, cancel = heartbeat(s, job.id, self.worker_id, self.cfg.lease_seconds,
                                                 step=progress.step, loss=progress.loss)
                        ckpt = _checkpoint_step(run_dir)
                        if ckpt > seen["ckpt"]:
                            seen["ckpt"] = ckpt
                            loss = "" if progress.loss is None else f": loss {progress.loss:.4f}"
                            add_event(s, job.id, f"step {progress.step}/{job.total_steps}{loss}; checkpoint at "
                                      f"step {ckpt}")
                            s.commit()
                    except Exception:  # noqa: BLE001 - a database hiccup: retry at the next beat
                        s.rollback()
                        continue
                    reason = "lost" if not ours else "cancel" if cancel else None
                    if reason and self._stop_reason is None:
                        self._stop_reason = reason
                        if self._training:
                            os.kill(os.getpid(), signal.SIGINT)  # the loop checkpoints and stops

        thread = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
        self._training = True
        thread.start()
        try:
            yield
        finally:
            self._training = False
            stop.set()
            thread.join()


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
