"""The tools at the size publishers release: SD 1.5 (or SD 2.1, SDXL) shapes, a few steps of each stage.

On a random-initialised model with the exact component configurations (`freezeasguard make-fixture`), each
stage runs in its own process (so one stage's freed memory cannot hide another's peak) and reports its wall
time and peak resident memory; the fine-tuning configurations alternate in one run and print ratios against
full fine-tuning, measured side by side:

- guard: making a guard (digests and sketches of every frozen tensor, the text encoders' digests) at 0.3 and
  0.5 of the parameters, and the guard file's size;
- verify: auditing the model directory against it;
- finetune: full, guarded at 0.3 and 0.5, and LoRA under the 0.5 guard: median step time, peak memory, optimizer
  state (benchmarks/finetune_savings.py's worker);
- mask: a mask step against a plain step (benchmarks/mask_step.py);
- learn: the peak memory of guard learning (two mask steps), as a multiple of the UNet's size;
- immunise: seconds per immunisation step (two steps, batch 1).

Results accumulate in WORK/fullsize.json, so an interrupted run resumes at the first stage it lacks.

    python benchmarks/fullsize.py --work runs/fullsize-sd15                    # SD 1.5 shape, 256 px, CPU
    python benchmarks/fullsize.py --arch sdxl --resolution 512 --work runs/fullsize-sdxl
    python benchmarks/fullsize.py --device cuda --mixed-precision bf16 --resolution 512 --work runs/fullsize-gpu
    python benchmarks/fullsize.py --width-divisor 8 --work /tmp/fs                # the same stages in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STAGES = ("guard", "verify", "finetune", "mask", "learn", "learn-sgd", "immunise")


def _data(model: Any, n: int = 8) -> Any:
    import numpy as np
    from PIL import Image

    from freezeasguard.data import ImageCaptionList, ImageTransform

    side = model.resolution
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]
    return ImageCaptionList(images, ["a photo of a red cat", "a painting of a blue dog"] * (n // 2), ImageTransform(side))


def stage(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One stage in this process (run by the parent as a child); returns its figures."""
    import torch

    from freezeasguard.guard import Guard
    from freezeasguard.model import DiffusionModel

    torch.set_num_threads(args.threads)
    model_dir = Path(args.work) / "model"
    t0 = time.perf_counter()
    if name == "guard":
        model = DiffusionModel.from_pretrained(model_dir)
        out: dict[str, Any] = {}
        for ratio in (0.3, 0.5):
            t = time.perf_counter()
            guard = Guard.random(model.unet, ratio, seed=0).with_text_encoders(model)
            path = guard.save(Path(args.work) / f"guard-{ratio}.json")
            out[str(ratio)] = {"seconds": time.perf_counter() - t, "bytes": path.stat().st_size,
                               "frozen_tensors": len(guard.frozen), "tensors": len(guard.names),
                               "ratio_by_params": guard.ratio_by_params}
        return out
    if name == "verify":
        from freezeasguard.audit import verify

        guard = Guard.load(Path(args.work) / "guard-0.5.json")
        report = verify(model_dir, guard)
        return {"seconds": time.perf_counter() - t0, "compliant": report.compliant, "checked": report.checked}
    model = DiffusionModel.from_pretrained(model_dir)
    if args.device != "cpu":
        model.to(args.device)
    unet_bytes = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    if name in ("learn", "learn-sgd"):
        from freezeasguard.learn import LearnConfig, learn_guard
        from freezeasguard.training import TrainConfig

        data = _data(model)
        optimizer = "sgd" if name == "learn-sgd" else "adamw"
        cfg = LearnConfig(ratio=0.3, mask_every=1, mask_steps=2, mask_batch=2, ranking_samples=0,
                          user=TrainConfig(batch_size=2, progress=False, mixed_precision=args.mixed_precision,
                                           optimizer=optimizer),
                          warm_start=TrainConfig(max_steps=1, batch_size=2, progress=False,
                                                 mixed_precision=args.mixed_precision))
        learn_guard(model, data, data, cfg)
        return {"seconds": time.perf_counter() - t0, "unet_bytes": unet_bytes, "optimizer": optimizer}
    if name == "immunise":
        from freezeasguard.protections import ReleaseContext, protect

        data = _data(model)
        ctx = ReleaseContext(model, data, data, 0.0, seed=0)
        t1 = time.perf_counter()
        protect("freeze-cross-attention+immunise", ctx, {"immunise": {"steps": 2, "reset_every": 2, "batch_size": 1}})
        return {"seconds": time.perf_counter() - t1, "steps": 2, "unet_bytes": unet_bytes}
    raise ValueError(name)


def torch_cpu():  # type: ignore[no-untyped-def]
    import torch

    return torch.device("cpu")


def child(name: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run `name` in a fresh process; its figures plus the process's wall time and peak resident memory."""
    result = Path(args.work) / f".{name}.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--stage", name, "--result", str(result), *argv])
    if proc.returncode == -9:  # the kernel's OOM killer: a figure in itself (it does not fit this machine)
        return {"failed": "killed by SIGKILL (out of memory)", "process_seconds": time.perf_counter() - t0}
    if proc.returncode != 0:
        raise SystemExit(f"fullsize: stage {name} failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    result.unlink()
    out["process_seconds"] = time.perf_counter() - t0
    return out


def run_script(script: str, argv: list[str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / script), *argv], check=True, capture_output=True, text=True)
    return proc.stdout, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("sd15", "sd21", "sdxl"), default="sd15")
    p.add_argument("--width-divisor", type=int, default=1)
    p.add_argument("--resolution", type=int, default=256, help="pixels (the CPU default; a GPU run: 512 or 1024)")
    p.add_argument("--work", required=True, help="folder for the fixture, guards and results (resumable)")
    p.add_argument("--steps", type=int, default=3, help="fine-tuning steps per configuration")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--finetune-runs", default="full,guarded,guarded-lora",
                   help="the fine-tuning configurations compared (SDXL on 24 GB: guarded-lora; full fine-tuning's "
                        "weights, gradients and AdamW moments alone are 41 GB)")
    p.add_argument("--mask-repeats", type=int, default=3, help="interleaved repeats of the mask and plain steps")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.stage:
        out = stage(args.stage, args)
        # VmHWM, not ru_maxrss: Linux carries a parent's peak into its children across fork and exec
        from freezeasguard.training.memory import peak_bytes

        out["peak_rss_bytes"] = peak_bytes(torch_cpu())[0]
        if args.device.startswith("cuda"):  # on a GPU the stage's memory is the device's, not the process's
            import torch

            out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        Path(args.result).write_text(json.dumps(out))
        return 0

    from freezeasguard.utils.files import atomic_write_json

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    record = work / "fullsize.json"
    settings = {k: getattr(args, k) for k in ("arch", "width_divisor", "resolution", "steps", "batch_size", "device",
                                              "mixed_precision")}
    results: dict[str, Any] = json.loads(record.read_text()) if record.is_file() else {}
    if results.get("settings") not in (None, settings):
        raise SystemExit(f"{record} holds a run with other settings ({results['settings']}); use another --work")
    results["settings"] = settings
    argv = ["--work", str(work), "--threads", str(args.threads), "--device", args.device,
            "--mixed-precision", args.mixed_precision]
    if not (work / "model" / "model_index.json").is_file():
        from freezeasguard.zoo.fixtures import write_fixture

        print(f"fullsize: writing the {args.arch} fixture (width / {args.width_divisor}, {args.resolution} px)", flush=True)
        t0 = time.perf_counter()
        write_fixture(work / "model", args.arch, width_divisor=args.width_divisor, resolution=args.resolution)
        results["fixture_seconds"] = time.perf_counter() - t0
    for name in args.stages.split(","):
        if name in results:
            print(f"fullsize: {name}: kept from an earlier run", flush=True)
            continue
        print(f"fullsize: {name} ...", flush=True)
        if name == "finetune":
            out = work / "finetune.json"
            text, seconds = run_script("finetune_savings.py", [
                "--model", str(work / "model"), "--guard", str(work / "guard-0.5.json"), "--steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--repeats", "1", "--threads", str(args.threads),
                "--device", args.device, "--mixed-precision", args.mixed_precision, "--runs", args.finetune_runs,
                "--json", str(out)])
            full = json.loads(out.read_text())
            results[name] = {"at_0.5": full["median"], "seconds": seconds, "printed": [text],
                             "runs": args.finetune_runs}
            at_03 = ",".join(r for r in args.finetune_runs.split(",") if r in ("full", "guarded"))
            if at_03:
                text3, seconds3 = run_script("finetune_savings.py", [
                    "--model", str(work / "model"), "--guard", str(work / "guard-0.3.json"), "--steps", str(args.steps),
                    "--batch-size", str(args.batch_size), "--repeats", "1", "--threads", str(args.threads),
                    "--device", args.device, "--mixed-precision", args.mixed_precision, "--runs", at_03,
                    "--json", str(out)])
                results[name].update({"at_0.3": json.loads(out.read_text())["median"],
                                      "seconds": seconds + seconds3, "printed": [text, text3]})
        elif name == "mask":
            # today's implementation only, with a state-free optimizer: the former one, and AdamW's two moments
            # beside the learner's buffers, do not fit 24 GB at SD 1.5 size
            text, seconds = run_script("mask_step.py", ["--model", str(work / "model"), "--batch-size", "2",
                                                        "--repeats", str(args.mask_repeats),
                                                        "--threads", str(args.threads), "--no-former", "--optimizer", "sgd",
                                                        "--device", args.device])
            results[name] = {"printed": text, "seconds": seconds}
        else:
            results[name] = child(name, args, argv)
        atomic_write_json(record, results)
        print(f"fullsize: {name} done", flush=True)
    report(results)
    return 0


def report(r: dict[str, Any]) -> None:
    s = r["settings"]
    mib = 2**20
    print(f"\n{s['arch']} shape (width / {s['width_divisor']}), {s['resolution']} px, batch {s['batch_size']}, "
          f"{s['device']}, mixed precision {s['mixed_precision']}")
    if "fixture_seconds" in r:
        print(f"fixture written in {r['fixture_seconds']:.0f} s")
    if "guard" in r:
        for ratio, g in r["guard"].items():
            if isinstance(g, dict) and "bytes" in g:
                print(f"guard at {ratio}: {g['frozen_tensors']}/{g['tensors']} tensors, {g['ratio_by_params']:.1%} of "
                      f"the parameters; made in {g['seconds']:.1f} s; file {g['bytes'] / mib:.2f} MiB")
    if "verify" in r:
        v = r["verify"]
        print(f"verify (model directory, guard 0.5): {v['seconds']:.1f} s, {v['checked']} tensors checked, "
              f"compliant {v['compliant']}; peak RSS {v['peak_rss_bytes'] / mib:.0f} MiB")
    if "finetune" in r:
        for key in ("at_0.3", "at_0.5"):
            table = r["finetune"].get(key, {})
            full = table.get("full")
            for run, row in table.items():
                time_x = "" if full is None else f" ({row['step_time_median_s'] / full['step_time_median_s']:.2f}x full)"
                peak_x = "" if full is None else f" ({row['peak_memory_bytes'] / full['peak_memory_bytes']:.2f}x)"
                print(f"finetune {key[3:]} {run:<13} step {row['step_time_median_s']:.2f} s{time_x}, peak "
                      f"{row['peak_memory_bytes'] / mib:.0f} MiB{peak_x}, "
                      f"optimizer state {row['optimizer_state_bytes'] / mib:.0f} MiB")
        if "full" not in r["finetune"].get("runs", "full"):
            print(f"finetune: only {r['finetune']['runs']} was run (full fine-tuning does not fit this machine's memory)")
    if "mask" in r:
        print(r["mask"]["printed"].rstrip())
    for key in ("learn", "learn-sgd"):
        lr_ = r.get(key)
        if lr_ is None:
            continue
        if "failed" in lr_:
            print(f"guard learning ({key}): {lr_['failed']} after {lr_['process_seconds']:.0f} s")
            continue
        kind, peak = ("GPU", lr_["peak_gpu_bytes"]) if "peak_gpu_bytes" in lr_ else ("RSS", lr_["peak_rss_bytes"])
        print(f"guard learning (2 mask steps, the user on {lr_['optimizer']}): peak {kind} {peak / mib:.0f} "
              f"MiB = {peak / lr_['unet_bytes']:.1f}x the UNet ({lr_['unet_bytes'] / mib:.0f} MiB); "
              f"{lr_['seconds']:.0f} s")
    if "immunise" in r and "failed" in r["immunise"]:
        print(f"immunise: {r['immunise']['failed']} after {r['immunise']['process_seconds']:.0f} s")
    elif "immunise" in r:
        im = r["immunise"]
        print(f"immunise (all cross-attention, {im['steps']} steps at batch 1, with encoding the 8 images and "
              f"captions): {im['seconds']:.1f} s; peak RSS {im['peak_rss_bytes'] / mib:.0f} MiB"
              + (f", peak GPU {im['peak_gpu_bytes'] / mib:.0f} MiB" if "peak_gpu_bytes" in im else ""))


if __name__ == "__main__":
    sys.exit(main())
