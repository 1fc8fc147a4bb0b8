"""Issue 11's frontier beyond the quick grid's two ratios (a research script, run from the repository root after
the quick grid on figures): the guard, random and importance-ratio freezing at more parameter budgets, with the
quick profile's users, on the grid's own release, compared with the grid's full fine-tune of the same seed.

usage: frontier_ratios.py run SEED RATIO [RATIO ...]   cells into runs/frontier-s{SEED} (resumable)
       frontier_ratios.py report                        the quick grid's figures cells and every runs/frontier-s*
                                                        cell together in runs/frontier: the bench's own report
                                                        (results.md, frontier.png) over ratios 0.1 to 0.7
The cells share every setting with the quick grid's (checked by the bench's cache: a cell made with other
settings is refused), so a report over both is one grid."""
import dataclasses, json, shutil, sys
from pathlib import Path
from freezeasguard.bench.runner import BENCH_PRODUCTS, run_bench
from freezeasguard.bench.profiles import PROFILES, cell_key
from freezeasguard.bench.cells import cell_settings

METHODS = ["random", "importance-ratio", "guard"]
quick = PROFILES["quick"]
src = Path("runs/quick")


def record(out: Path, profile) -> None:
    (out / ".freezeasguard-run.json").write_text(json.dumps({
        "format": "freezeasguard-run", "command": "bench",
        "identity": json.loads(json.dumps({"cell_settings": cell_settings(profile)}, sort_keys=True)),
        "products": sorted(BENCH_PRODUCTS)}))


if sys.argv[1] == "run":
    seed, ratios = int(sys.argv[2]), [float(r) for r in sys.argv[3:]]
    p = dataclasses.replace(quick, scenarios=["figures"], methods=["none"] + METHODS, ratios=ratios, seeds=[seed],
                            curve_cells=["none"])
    out = Path(f"runs/frontier-s{seed}")
    if not out.exists():
        (out / "cells").mkdir(parents=True)
        shutil.copytree(src / "relearn" / f"figures-seed{seed}", out / "relearn" / f"figures-seed{seed}")
        for m in ("base", "none"):
            k = cell_key("figures", seed, m, None)
            shutil.copy(src / "cells" / f"{k}.json", out / "cells" / f"{k}.json")
        record(out, p)
    run_bench(out, p, command=" ".join(sys.argv))
elif sys.argv[1] == "report":
    out = Path("runs/frontier")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for d in [src] + sorted(Path("runs").glob("frontier-s*")):
        for c in (d / "cells").glob("figures-*.json"):
            shutil.copy(c, out / "cells" / c.name)
    p = dataclasses.replace(quick, scenarios=["figures"], ratios=[0.1, 0.2, 0.3, 0.5, 0.7])
    record(out, p)
    run_bench(out, p, command="frontier_ratios.py report", report_only=True)
