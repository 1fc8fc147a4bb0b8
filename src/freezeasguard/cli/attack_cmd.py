"""`freezeasguard attack`: red-team a release with registered attacks, or the whole battery."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..attacks import ATTACKS, BATTERY
from . import _fail, _offline, app, load_model_arg
from .options import DebugOpt, GuardOpt, ModelOpt, OutOpt, OverwriteOpt, SeedOpt


@app.command()
def attack(
    guard: GuardOpt,
    illegal: Annotated[Path, typer.Option(help="Image folder of the protected concepts (the attacker's images; a "
                                               "seeded share is held out to measure what each attacker gets).",
                                          exists=True, file_okay=False)],
    out: OutOpt = Path("runs/attack"),
    model: ModelOpt = "embedded",
    name: Annotated[list[str] | None, typer.Option("--attack", "-a", help="A registered attack (repeat); see the "
                                                   "list below.")] = None,
    battery: Annotated[bool, typer.Option("--battery", help="Every attack of the battery that needs only the "
                                                           "protected images (all but 'benign').")] = False,
    custom: Annotated[Path | None, typer.Option(help="An attack of your own: an AttackConfig as JSON (fields as "
                                                     "in docs/cli.md), run as 'custom'.", exists=True,
                                                dir_okay=False)] = None,
    protected_word: Annotated[list[str] | None, typer.Option(help="What your captions call a protected concept "
                                                             "(repeat); the renamed and synonym attacks replace it.")] = None,
    caption_column: Annotated[str, typer.Option(help="Caption column of the folder's metadata.")] = "text",
    held_out: Annotated[float, typer.Option(help="Share of the protected images held out for measuring.",
                                            min=0.01, max=0.9)] = 0.25,
    attack_steps: Annotated[int | None, typer.Option(help="Every attack's step budget instead of its own (a "
                                                          "quicker, weaker look).", min=1)] = None,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    _offline()
    import sys

    from ..attacks import AttackConfig, get_attack
    from ..attacks.redteam import PRODUCTS, red_team
    from ..data import ImageCaptionFolder, ImageTransform
    from ..errors import FreezeAsGuardError
    from ..finetuning import GuardViolation
    from ..guard import Guard
    from ..utils.files import claim_output_dir, read_json

    try:
        chosen = [(n, get_attack(n).config) for n in (name or [])]
        if battery:
            chosen += [(n, ATTACKS[n].config) for n in BATTERY if ATTACKS[n].config.data != "benign"
                       and n not in {c for c, _ in chosen}]
        if custom is not None:
            chosen.append(("custom", AttackConfig.from_dict(read_json(custom, "attack config"))))
        if not chosen:
            raise ValueError("name an attack (--attack NAME), --battery, or --custom FILE")
        needs_words = [n for n, c in chosen if c.captions != "given"]
        if needs_words and not protected_word:
            raise ValueError(f"{', '.join(needs_words)} rename the protected concepts: say what your captions call "
                             "them (--protected-word)")
        g = Guard.load(guard)
        identity = {"guard": g.digest(), "model": str(model), "illegal": str(illegal), "seed": seed,
                    "held_out": held_out, "attack_steps": attack_steps}
        with claim_output_dir(out, "attack", identity, PRODUCTS, overwrite=overwrite):
            m = load_model_arg(model)
            data = ImageCaptionFolder(illegal, ImageTransform(m.resolution), caption_column=caption_column)
            result = red_team(lambda: m, g, data, chosen, out, seed=seed, protected_words=protected_word or (),
                              held_out_share=held_out, steps=attack_steps,
                              command="freezeasguard " + " ".join(sys.argv[1:]))
    except GuardViolation as exc:
        raise _fail(exc) from exc
    except (FreezeAsGuardError, ValueError, OSError) as exc:
        raise _fail(exc) from exc
    worst = result["worst_case"]
    typer.echo(f"wrote {out / 'attacks.md'}: worst case " + ("n/a (every attack void)" if worst is None else
               f"{100 * worst['mitigation']:.1f}% mitigation under {worst['attack']}"))


attack.__doc__ = (
    "Red-team a release: run attacks through the guarded fine-tuning path, each under GUARD and without it, and "
    "report what each attacker gets (OUT/attacks.md, attacks.json, attacks.png; resumable per attack).\n\n"
    "An attack the guard would refuse (LoRA on a frozen module, text-encoder training it forbids) is refused "
    "before any work, naming the module (exit 2).\n\nRegistered attacks (--attack NAME):\n\n"
    + "\n\n".join(f"{a.name}: {a.description}" for a in ATTACKS.values()))
