"""The training of one job: shared by the worker's in-process path and the launched (torchrun) path.

`train_job` runs `finetune` under the publisher's guard into `<job>/run` and renders the sample grid; the
worker then verifies and publishes. With `processes_per_job > 1` the worker launches this module under
torchrun (`python -m torch.distributed.run --standalone --nproc_per_node N -m freezeasguard.service.jobrun
<job folder>`): every rank runs `train_job` (finetune makes its own Accelerator, so the ranks join one
data-parallel run and only the main process writes). torchrun rather than `accelerate launch`: it ships with
torch and takes everything from its command line, while `accelerate launch` also reads the machine's accelerate
config file, so the same worker setting could launch differently on two machines; the Accelerator inside picks
torchrun's environment up either way. The ranks talk to the worker through small files in the job folder, never
through the database:

- `launch.json` (worker -> ranks): the service config, the hyperparameters and the process count;
- `progress.json` (rank 0 -> worker): step and loss, rewritten atomically at most every PROGRESS_EVERY_S;
- `stop` (worker -> ranks): present when the job must stop; rank 0 sees it at a step boundary and the
  training loop's interrupt (checkpoint, then stop on every rank together) does the rest;
- `outcome.<rank>.json` (ranks -> worker): how each rank ended (succeeded / stopped / failed with a code).

A rank never outlives its worker: it asks the kernel for SIGKILL when its parent (torchrun) dies and watches the
worker's pid, so a worker killed with SIGKILL leaves no process training the folder its successor resumes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..training import TrainCallback
from .config import ServiceConfig, ServiceStartError

LAUNCH = "launch.json"
PROGRESS = "progress.json"
STOP = "stop"
OUTCOME = "outcome.{rank}.json"
SAMPLES = "samples.png"
WORKER_PID_ENV = "FREEZEASGUARD_WORKER_PID"
PROGRESS_EVERY_S = 0.2


def error_code(exc: BaseException) -> str:
    """The job's error code for an exception raised while training (same codes on both paths)."""
    from ..errors import DataError, FreezeAsGuardError
    from ..finetuning import GuardViolation

    if isinstance(exc, GuardViolation):
        return "guard_violation"
    if isinstance(exc, FloatingPointError):
        return "training_diverged"
    if isinstance(exc, DataError):
        return "invalid_training_data"
    # the publisher's side: guard and model do not match, unreadable model or checkpoint
    return "service_error" if isinstance(exc, FreezeAsGuardError) else "internal_error"


def error_message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if error_code(exc) == "internal_error" else str(exc)


def processes_for(batch_size: int, wanted: int) -> int:
    """Processes for a job: the most, up to `wanted`, that split its batch evenly.

    The job's batch_size is the global batch (what the user asked for whatever the publisher's hardware), so
    each process takes batch_size / processes examples per step.
    """
    return max(n for n in range(1, max(1, wanted) + 1) if batch_size % n == 0)


def load_base_model(model: str):  # type: ignore[no-untyped-def]
    from ..model import DiffusionModel
    from ..zoo import BASES, load_base

    return load_base(model) if model in BASES else DiffusionModel.from_pretrained(Path(model))


def check_release(cfg: ServiceConfig) -> Any:
    """The publisher's guard, checked against the model every job fine-tunes, as `finetune` checks it before
    each job: the tensor names and shapes (the guard's fingerprint of its base) and the frozen values. Raises
    ServiceStartError saying which does not fit, so `serve` and `worker` refuse to start rather than accept
    jobs that would all fail."""
    import gc

    from ..guard import Guard

    try:
        guard = Guard.load(cfg.guard)
    except (OSError, ValueError) as exc:
        raise ServiceStartError(f"the service's guard cannot be used: {exc}") from exc
    try:
        model = load_base_model(cfg.model)
    except Exception as exc:  # noqa: BLE001 - a loader raises many types; all mean the same here
        raise ServiceStartError(f"the service's model {cfg.model} cannot be loaded: {exc}") from exc
    try:
        guard.check_values(model.unet)
    except ValueError as exc:
        raise ServiceStartError(f"the guard {cfg.guard} does not fit the model {cfg.model}, so every job would "
                                f"fail: {exc}. Start the service with the guard made for this model.") from exc
    finally:
        del model  # the API never trains: it does not keep the weights
        gc.collect()
    return guard


def train_job(cfg: ServiceConfig, folder: Path, hp: dict[str, Any], processes: int,
              callbacks: list[Any] | None = None) -> None:
    """Fine-tune the job's upload under the publisher's guard into `<folder>/run`; the main process also
    renders the sample grid there (published only once the derivative passes `verify`)."""
    import torch

    from ..data import ImageCaptionFolder, ImageTransform
    from ..finetuning import FinetuneConfig, finetune
    from ..guard import Guard
    from ..training import TrainConfig, make_accelerator
    from ..utils.images import save_grid

    guard = Guard.load(cfg.guard)
    model = load_base_model(cfg.model)
    data = ImageCaptionFolder(folder / "data", ImageTransform(model.resolution))
    config = FinetuneConfig(
        method=hp["method"], lora_rank=int(hp["lora_rank"]),
        train=TrainConfig(max_steps=int(hp["steps"]), batch_size=int(hp["batch_size"]) // processes,
                          learning_rate=float(hp["learning_rate"]), seed=int(hp["seed"]),
                          checkpoint_every=cfg.checkpoint_every, progress=False),
    )
    accelerator = make_accelerator(config.train.mixed_precision)
    if accelerator.num_processes != processes:
        raise RuntimeError(f"the job was launched for {processes} process(es) but joined {accelerator.num_processes}")
    run_dir = folder / "run"
    finetune(model, data, guard=guard, config=config, output_dir=run_dir, callbacks=callbacks,
             accelerator=accelerator)
    n = min(cfg.sample_images, len(data))
    if n and accelerator.is_main_process:
        with torch.no_grad():
            images = model.sample(list(data.captions[:n]), seed=int(hp["seed"]), num_inference_steps=cfg.sample_steps)
        save_grid(images, run_dir / SAMPLES, nrow=n, scale=max(1, 128 // model.resolution))


# ---------------------------------------------------------------------------- the launched ranks
class _FileProgress(TrainCallback):
    """Rank 0 publishes step and loss to progress.json; every rank turns a `stop` file into an interrupt."""

    name = "service-file-progress"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._written = 0.0
        self._stopping = False

    def _write(self, ctx: Any, force: bool = False) -> None:
        from ..utils.files import atomic_write_json

        now = time.monotonic()
        if ctx.accelerator.is_main_process and (force or now - self._written >= PROGRESS_EVERY_S):
            atomic_write_json(self.folder / PROGRESS, {"step": ctx.step, "loss": ctx.loss})
            self._written = now

    def on_train_start(self, ctx: Any) -> None:
        self._write(ctx, force=True)

    def on_step_end(self, ctx: Any) -> None:
        self._write(ctx, force=ctx.step == ctx.config.max_steps)
        # One rank asking is enough: the loop reduces the interrupt flag over all ranks at the step boundary.
        if not self._stopping and ctx.accelerator.is_main_process and (self.folder / STOP).exists():
            self._stopping = True
            self._write(ctx, force=True)
            os.kill(os.getpid(), signal.SIGINT)


def _die_with_worker() -> None:
    """This rank must not outlive the worker: the kernel kills it with its parent (torchrun, Linux), and a
    thread watches the worker itself (a torchrun that outlived the worker, or a platform without prctl)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = os.getppid()
    worker = int(os.environ.get(WORKER_PID_ENV, "0"))

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def watch() -> None:
        while True:
            if os.getppid() != parent or (worker and gone(worker)):
                os._exit(3)
            time.sleep(0.5)

    if parent == 1 or (worker and gone(worker)):  # already orphaned before the kernel was asked
        os._exit(3)
    threading.Thread(target=watch, name="worker-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    from ..utils.files import atomic_write_json, read_json

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m freezeasguard.service.jobrun <job folder> (run by the service's worker under "
              "torchrun)", file=sys.stderr)
        return 2
    _die_with_worker()
    folder = Path(args[0])
    rank = int(os.environ.get("RANK", "0"))
    launch = read_json(folder / LAUNCH, "job launch record")
    try:
        train_job(ServiceConfig.from_dict(launch["config"]), folder, launch["hyperparameters"],
                  int(launch["processes"]), callbacks=[_FileProgress(folder)])
        outcome: dict[str, Any] = {"status": "succeeded"}
    except KeyboardInterrupt:
        outcome = {"status": "stopped"}
    except Exception as exc:  # noqa: BLE001 - reported to the worker, which fails the job with this code
        import traceback

        traceback.print_exc()
        outcome = {"status": "failed", "code": error_code(exc), "message": error_message(exc)}
    if rank == 0 or outcome["status"] == "failed":
        atomic_write_json(folder / OUTCOME.format(rank=rank), outcome)
    from ..training import release_process_group

    release_process_group()
    return 1 if outcome["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
