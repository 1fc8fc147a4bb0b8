"""Status-polling throughput and latency of the fine-tuning service while a job trains (localhost only).

Starts `freezeasguard serve` (one uvicorn process) and one `freezeasguard worker` on a temporary data folder,
submits a long LoRA job, waits until it trains, then runs `--clients` threads that poll
`GET /v1/fine-tunes/{id}` for `--seconds` seconds over keep-alive connections. Prints requests per second and
latency percentiles (measured by the client, so they include its own overhead), how many training steps the
worker made during the load, and whether p99 stayed under `--p99-ms` (exit 1 if not). Bounded: the job is
cancelled and every process stopped at the end.

    python benchmarks/service_load.py                          # embedded default, 4 clients, 20 s
    python benchmarks/service_load.py --model tiny --clients 8 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="'embedded', 'tiny' (a random 16 px model) or a directory")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--p99-ms", type=float, default=100.0)
    ap.add_argument("--json", action="store_true", help="print only the JSON record")
    args = ap.parse_args()
    if args.clients < 1 or args.seconds <= 0:
        ap.error("--clients must be >= 1 and --seconds > 0")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import httpx

    from freezeasguard.data import write_imagefolder
    from freezeasguard.guard import Guard
    from freezeasguard.model import DiffusionModel
    from freezeasguard.service.config import ServiceConfig
    from freezeasguard.service.db import create_key, make_engine, session_factory
    from freezeasguard.tiny import TinySpec, write_tiny_model
    from freezeasguard.zoo import load_base

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="service-load-") as tmp:
        root = Path(tmp)
        if args.model == "tiny":
            model_path = str(write_tiny_model(root / "model", TinySpec(), seed=0))
            model = DiffusionModel.from_pretrained(model_path)
        elif args.model == "embedded":
            model_path, model = "embedded", load_base()
        else:
            model_path = str(Path(args.model).resolve())
            model = DiffusionModel.from_pretrained(model_path)
        Guard.random(model.unet, 0.3, seed=0).save(root / "guard.json")
        from PIL import Image

        side = model.resolution
        images = [Image.new("RGB", (side, side), (40 * i, 255 - 40 * i, 128)) for i in range(6)]
        write_imagefolder(root / "data", images, [f"a colour swatch number {i}" for i in range(6)])
        cfg = ServiceConfig(model=model_path, guard=str(root / "guard.json"), data_dir=str(root / "svc"),
                            max_steps=1_000_000, max_steps_per_day=10_000_000, checkpoint_every=0,
                            sample_images=0)
        (root / "service.json").write_text(json.dumps(cfg.to_dict()))
        cfg.root.mkdir()
        with session_factory(make_engine(cfg.database_url))() as s:
            _, secret = create_key(s, "load")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cli = [sys.executable, "-m", "freezeasguard"]
        procs = [subprocess.Popen([*cli, "serve", "--config", str(root / "service.json"), "--port", str(port),
                                   "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL),
                 subprocess.Popen([*cli, "worker", "--config", str(root / "service.json")], env=env,
                                  stdout=subprocess.DEVNULL)]
        try:
            headers = {"Authorization": f"Bearer {secret}"}
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise SystemExit("the server did not come up")
                time.sleep(0.2)
            from freezeasguard.service.client import Client

            with Client(url, secret) as c:
                job = c.submit(root / "data", method="lora", steps=1_000_000, batch_size=2)
                while (j := c.status(job["id"]))["step"] < 1:
                    if j["status"] not in ("queued", "running") or time.monotonic() > deadline:
                        raise SystemExit(f"the job did not start training: {j['status']} {j['error']}")
                    time.sleep(0.2)
                step0 = j["step"]

            latencies: list[float] = []
            errors = [0]
            lock = threading.Lock()
            stop_at = time.monotonic() + args.seconds

            def poll() -> None:
                mine: list[float] = []
                bad = 0
                with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
                    while time.monotonic() < stop_at:
                        t0 = time.perf_counter()
                        r = http.get(f"/v1/fine-tunes/{job['id']}")
                        mine.append(time.perf_counter() - t0)
                        bad += r.status_code != 200 or r.json()["status"] != "running"
                with lock:
                    latencies.extend(mine)
                    errors[0] += bad

            load0 = os.getloadavg()[0]
            threads = [threading.Thread(target=poll) for _ in range(args.clients)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            with Client(url, secret) as c:
                step1 = c.status(job["id"])["step"]
                c.cancel(job["id"])
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()

    lat = sorted(x * 1000 for x in latencies)
    record = {
        "model": args.model, "clients": args.clients, "seconds": round(wall, 2), "requests": len(lat),
        "errors": errors[0], "requests_per_s": round(len(lat) / wall, 1),
        "latency_ms": {"p50": round(_percentile(lat, 50), 2), "p95": round(_percentile(lat, 95), 2),
                       "p99": round(_percentile(lat, 99), 2), "max": round(lat[-1], 2) if lat else None,
                       "mean": round(statistics.fmean(lat), 2) if lat else None},
        "training_steps_during_load": step1 - step0,
        "loadavg_1min_before": round(load0, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(), "p99_limit_ms": args.p99_ms,
    }
    ok = bool(lat) and record["latency_ms"]["p99"] <= args.p99_ms and errors[0] == 0 and step1 > step0
    record["ok"] = ok
    print(json.dumps(record, indent=2))
    if not args.json:
        print(f"{'PASS' if ok else 'FAIL'}: {record['requests_per_s']} req/s, p99 {record['latency_ms']['p99']} ms "
              f"(limit {args.p99_ms}), {record['training_steps_during_load']} training steps during the load")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
