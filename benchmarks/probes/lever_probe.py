"""Issue 11 lever probes (a research script, run from the repository root after the quick grid on figures):
lever probes on the quick profile's settings (figures, relearn, 400 illegal / 800 legal steps, 100 samples),
reusing runs/quick's release and base cell (mitigation is against its full fine-tune).
usage: lever_probe.py NAME METHOD RATIO SEED '{json overrides}'
overrides: {"immunise": {...}, "learn": {...}} replace fields of the profile's sections; {"legal_far_repeat": K}
repeats the publisher's legal-far images K times in its legal sample (lever 4's share of legal-far vs legal-near:
20 far and 30 near images on figures; K=4 makes far 73%); {"profile": {...}}
replaces the profile's own fields (the users': "steps", "curve_steps", "lr", ...). Those change what every cell
shares, so the base cell is then recomputed, and the method is compared with the probe's own full fine-tune
when "none" is the METHOD of another probe with the same "profile" overrides. Examples (session 5):
  lever_probe.py long-xattn freeze-cross-attention+immunise 0.3 0 \
      '{"profile": {"steps": 1600, "curve_steps": [25, 50, 100, 200, 400, 800, 1600]}}'
  lever_probe.py lr5e-4-none none 0.3 0 '{"profile": {"lr": 5e-4}}'"""
import dataclasses, json, shutil, sys
from pathlib import Path
from freezeasguard.bench.profiles import PROFILES, cell_key
from freezeasguard.bench.runner import run_bench, BENCH_PRODUCTS
from freezeasguard.bench.cells import cell_settings
name, method, ratio, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
over = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
p = PROFILES["quick"]
kw = {}
if "immunise" in over:
    kw["immunise"] = dataclasses.replace(p.immunise, **over["immunise"])
if "learn" in over:
    kw["learn"] = dataclasses.replace(p.learn, **over["learn"])
kw.update(over.get("profile", {}))
p = dataclasses.replace(p, scenarios=["figures"], methods=[method], ratios=[ratio], seeds=[seed],
                        curve_cells=[f"{method}@{ratio:g}", method], **kw)
out = Path("runs/probe5") / name
src = Path("runs/quick")
if not out.exists():
    (out / "cells").mkdir(parents=True)
    shutil.copytree(src / "relearn" / f"figures-seed{seed}", out / "relearn" / f"figures-seed{seed}")
    if "profile" not in over:  # the grid's base cell holds only while the shared settings are the grid's
        k = cell_key("figures", seed, "base", None)
        shutil.copy(src / "cells" / f"{k}.json", out / "cells" / f"{k}.json")
    (out / ".freezeasguard-run.json").write_text(json.dumps({"format": "freezeasguard-run", "command": "bench",
        "identity": json.loads(json.dumps({"cell_settings": cell_settings(p)}, sort_keys=True)), "products": sorted(BENCH_PRODUCTS)}))
if over.get("legal_far_repeat", 1) != 1:
    import freezeasguard.bench as bench
    from freezeasguard.bench import emoji

    k, prepare = int(over["legal_far_repeat"]), bench.prepare_setting

    def with_more_far(*args, **kw):
        setting = prepare(*args, **kw)
        sc = setting.scenario
        items = list(sc.items("legal_near", "publisher")) + k * list(sc.items("legal_far", "publisher"))
        setting.publisher_legal = emoji.dataset(items, setting.publisher_legal[0]["pixel_values"].shape[-1],
                                                preload=True)
        return setting

    bench.prepare_setting = with_more_far
run_bench(out, p, command=" ".join(sys.argv))
