"""The command line: fast help, info, sample, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from freezeasguard.cli import app

runner = CliRunner()


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from freezeasguard.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'info' in r.output and 'sample' in r.output\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"--help imported {proc.stdout.strip()}"


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "freezeasguard", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "freezeasguard" in proc.stdout


def test_info(tiny_latent_dir):
    result = runner.invoke(app, ["info", "--model", str(tiny_latent_dir), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["space"] == "latent" and info["resolution"] == 32
    assert info["components"]["unet"]["tensors"] > 0
    assert info["components"]["unet"]["parameters"] > info["components"]["unet"]["tensors"]
    table = runner.invoke(app, ["info", "-m", str(tiny_latent_dir)])
    assert table.exit_code == 0 and "UNet2DConditionModel" in table.output


def test_info_on_a_bad_directory(tmp_path):
    result = runner.invoke(app, ["info", "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert "model_index.json" in result.output


def test_sample_writes_a_grid(tiny_dir, tmp_path):
    out = tmp_path / "grid.png"
    args = ["sample", "--model", str(tiny_dir), "-p", "a red cat", "-p", "a dog", "--n", "3", "--sampling-steps", "3",
            "--png", str(out), "--scale", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    img = Image.open(out)
    # 2 rows x 3 columns of 16 px images with 1 px borders, scaled 2x
    assert img.size == ((3 * 17 + 1) * 2, (2 * 17 + 1) * 2)
    again = tmp_path / "again.png"
    runner.invoke(app, args[:-4] + ["--png", str(again), "--scale", "2"])
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(again)))


def test_tiny_refuses_to_overwrite(tmp_path):
    assert runner.invoke(app, ["tiny", str(tmp_path / "m")]).exit_code == 0
    result = runner.invoke(app, ["tiny", str(tmp_path / "m")])
    assert result.exit_code == 2 and "already exists" in result.output


# --------------------------------------------------------------------------------------------- conventions
def _commands():
    """Every command of the app, by its full name ('guard random'), as the click command typer builds."""
    import typer

    def walk(cmd, prefix):
        subs = getattr(cmd, "commands", None)
        if subs is None:
            yield prefix, cmd
            return
        for name, sub in subs.items():
            yield from walk(sub, f"{prefix} {name}".strip())

    return dict(walk(typer.main.get_command(app), ""))


def _options(cmd):
    # a boolean flag's "--no-..." form (secondary_opts) is an option the docs may show too
    return {opt: p for p in cmd.params for opt in (*p.opts, *getattr(p, "secondary_opts", ())) if opt.startswith("--")}


from freezeasguard.cli.options import ALL_COMMANDS as ALL  # noqa: E402
from freezeasguard.cli.options import SHARED_EXCEPTIONS  # noqa: E402
from freezeasguard.cli.options import SHARED_OPTIONS as SHARED  # noqa: E402

# Option names two commands use for values of different kinds (bench --method lists protections, finetune
# --method is full/LoRA; bench --scenario takes a list, demo and learn one).
DIFFERENT_THINGS = {"--method", "--scenario"}


def _describe(param):
    """Type (with range and value check), arity, flag-ness and help: what a user sees of an option."""
    descriptor = getattr(param, "type_descriptor", None)  # recent typer; older ones expose a click type
    kind = str(descriptor.annotation) if descriptor is not None else param.type.name
    check = getattr(param.callback, "__qualname__", None)
    return (kind, getattr(param, "min", None), getattr(param, "max", None), check, bool(param.multiple),
            bool(getattr(param, "is_flag", False)), param.help)


def test_shared_options_have_one_name_type_and_help_everywhere():
    commands = _commands()
    assert {"info", "sample", "tiny", "finetune", "learn", "inspect", "verify", "demo", "bench", "guard random",
            "guard top", "guard names", "guard combine", "guard diff", "zoo pretrain", "zoo ship", "zoo check"} <= set(commands)
    for opt, wanted in SHARED.items():
        names = set(commands) if wanted == ALL else wanted
        missing = sorted(n for n in names if opt not in _options(commands[n]))
        assert not missing, f"{opt} missing from: {missing}"
        # no hole: every other command with this option name is a listed exception
        unlisted = sorted(n for n, cmd in commands.items() if opt in _options(cmd) and n not in names
                          and opt not in SHARED_EXCEPTIONS.get(n, {}))
        assert not unlisted, f"{opt} is taken by {unlisted} without being one of its commands or an exception"
        described = {n: _describe(_options(commands[n])[opt]) for n in sorted(names)}
        assert len(set(described.values())) == 1, f"{opt} differs across commands: {described}"
    # any other option name two commands share takes the same kind of value (its help may say what is in it)
    seen: dict[str, dict[str, tuple]] = {}
    for name, cmd in commands.items():
        for opt, p in _options(cmd).items():
            seen.setdefault(opt, {})[name] = _describe(p)[:-1]
    for opt, by_cmd in seen.items():
        if opt in SHARED or opt in DIFFERENT_THINGS or opt == "--help":
            continue
        assert len(set(by_cmd.values())) == 1, f"{opt} means different things: {by_cmd}"


def test_option_defaults_are_the_configs_defaults():
    """The CLI writes its defaults out (importing the configs would make --help slow): they must be the
    dataclasses' defaults, or `--print-config` and a run without options would disagree with the docs."""
    from freezeasguard.cli.finetune_cmd import FINETUNE_FIELDS
    from freezeasguard.cli.immunise_cmd import IMMUNISE_FIELDS
    from freezeasguard.cli.learn_cmd import LEARN_FIELDS
    from freezeasguard.finetuning import FinetuneConfig
    from freezeasguard.learn import LearnConfig
    from freezeasguard.protections.immunise import ImmuniseConfig

    commands = _commands()
    for command, fields, cfg in (("finetune", FINETUNE_FIELDS, FinetuneConfig()), ("learn", LEARN_FIELDS, LearnConfig()),
                                 ("immunise", IMMUNISE_FIELDS, ImmuniseConfig())):
        params = {p.name: p for p in commands[command].params}
        for param, dotted in fields:
            value = cfg.to_dict()
            for key in dotted.split("."):
                value = value[key]
            assert params[param].default == value, (command, param, params[param].default, value)
    assert LearnConfig().ratio_by == "params"


def test_print_config_round_trips_and_unknown_fields_are_named(tmp_path):
    from freezeasguard.learn import LearnConfig

    printed = runner.invoke(app, ["learn", "--print-config"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.output) == LearnConfig().to_dict()
    # options override the file; a nested field set alone keeps the other nested defaults (not TrainConfig's)
    (tmp_path / "c.json").write_text(json.dumps({"mask_steps": 7, "user": {"batch_size": 2}}))
    merged = json.loads(runner.invoke(app, ["learn", "--config", str(tmp_path / "c.json"), "--lr", "3e-4",
                                            "--print-config"]).output)
    want = LearnConfig().to_dict()
    want["mask_steps"] = 7
    want["user"].update(batch_size=2, learning_rate=3e-4)
    assert merged == want
    ft = runner.invoke(app, ["finetune", str(tmp_path), "--print-config", "--lr", "1e-3"])
    train = json.loads(ft.output)["train"]
    assert (train["max_steps"], train["batch_size"], train["learning_rate"]) == (400, 32, 1e-3)
    for command in (["learn"], ["finetune", str(tmp_path)], ["zoo", "pretrain"]):
        (tmp_path / "bad.json").write_text(json.dumps({"ratios": 0.3}))
        bad = runner.invoke(app, [*command, "--config", str(tmp_path / "bad.json"), "--print-config"])
        assert bad.exit_code == 2 and "ratios" in bad.output and "bad.json" in bad.output, bad.output
        assert "Traceback" not in bad.output


def _user_error_cases(tmp_path, tiny_dir):
    """(arguments, what the message must name) for inputs that must give exit 2 and no traceback."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    done = tmp_path / "done"
    done.mkdir()
    (done / "guard.json").write_text("{}")
    (tmp_path / "not-json.json").write_text("{nope")
    (tmp_path / "list.json").write_text("[1, 2]")
    return [
        (["finetune", str(tmp_path), "--lr", "inf"], "--lr"),
        (["finetune", str(tmp_path), "--lr", "nan"], "--lr"),
        (["learn", "--lr", "0"], "--lr"),
        (["learn", "--warm-lr", "-1"], "--warm-lr"),
        (["learn", "--ratio", "1.5"], "--ratio"),
        (["learn", "--ratio-by", "bytes"], "--ratio-by"),
        (["learn", "--model", str(tiny_dir)], "--scenario"),
        (["learn", "--config", str(tmp_path / "not-json.json")], "not-json.json"),
        (["learn", "--config", str(tmp_path / "list.json")], "list.json"),
        (["verify", str(tiny_dir), "--guard", str(a_file), "--tolerance", "nan"], "--tolerance"),
        (["verify", str(tiny_dir), "--guard", str(a_file), "--tolerance", "-1"], "--tolerance"),
        (["verify", str(tiny_dir), "--guard", str(tmp_path / "none.json")], "none.json"),
        (["guard", "random", "--model", str(tiny_dir), "--out", str(done)], "guard.json"),
        (["guard", "random", "--model", str(tiny_dir), "--out", str(a_file)], "a-file"),
        (["guard", "top", str(tmp_path / "list.json"), "--model", str(tiny_dir), "--out", str(tmp_path / "t")], "list.json"),
        (["info", "--model", str(tmp_path / "nowhere")], "nowhere"),
        (["sample", "-p", "x", "--model", str(tiny_dir), "--sampling-steps", "2", "--png", str(a_file / "g.png")], "a-file"),
    ]


def test_user_errors_exit_2_and_name_the_input(tmp_path, tiny_dir):
    for args, named in _user_error_cases(tmp_path, tiny_dir):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.exit_code, result.output)
        assert named in result.output, (args, result.output)
        assert "Traceback" not in result.output, (args, result.output)
        # an exit, not an exception escaping the command (CliRunner records a clean exit as SystemExit)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)


def test_guard_out_is_a_directory_written_once_unless_overwrite(tmp_path, tiny_dir):
    from freezeasguard.guard import Guard

    out = tmp_path / "existing"
    out.mkdir()
    args = ["guard", "random", "--model", str(tiny_dir), "--out", str(out), "--ratio", "0.4"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    g = Guard.load(out / "guard.json")
    assert 0.3 < g.ratio_by_params <= 0.4 and g.provenance["ratio_by"] == "params"
    assert "of tensors" in first.output and "of parameters" in first.output
    mtime = (out / "guard.json").stat().st_mtime_ns
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert (out / "guard.json").stat().st_mtime_ns == mtime
    assert runner.invoke(app, args + ["--overwrite", "--seed", "1"]).exit_code == 0
    assert Guard.load(out / "guard.json").frozen != g.frozen


def test_inspect_png_into_a_read_only_directory(tmp_path, tiny_dir):
    import os

    assert runner.invoke(app, ["guard", "random", "--model", str(tiny_dir), "--out", str(tmp_path)]).exit_code == 0
    # a file where the PNG's directory should be (the same OSError class, and root cannot write there either)
    (tmp_path / "a-file").write_text("x")
    blocked = runner.invoke(app, ["inspect", str(tmp_path / "guard.json"), "--png", str(tmp_path / "a-file" / "b.png")])
    assert blocked.exit_code == 2 and "a-file" in blocked.output and "Traceback" not in blocked.output, blocked.output
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode: the case cannot arise
            import pytest

            pytest.skip("running as root: a read-only directory is writable")
        result = runner.invoke(app, ["inspect", str(tmp_path / "guard.json"), "--png", str(locked / "b.png")])
        assert result.exit_code == 2 and "b.png" in result.output, result.output
    finally:
        locked.chmod(0o700)


def test_internal_errors_exit_3_without_a_traceback_unless_debug(tmp_path, tiny_dir, monkeypatch):
    from freezeasguard.guard import Guard

    assert runner.invoke(app, ["guard", "random", "--model", str(tiny_dir), "--out", str(tmp_path)]).exit_code == 0

    def broken(self, other):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Guard, "diff", broken)
    g = str(tmp_path / "guard.json")
    quiet = runner.invoke(app, ["guard", "diff", g, g])
    assert quiet.exit_code == 3 and "internal error: RuntimeError: a bug" in quiet.output
    assert "--debug" in quiet.output and "Traceback" not in quiet.output
    loud = runner.invoke(app, ["guard", "diff", g, g, "--debug"])
    assert isinstance(loud.exception, RuntimeError)
    # the flag does not leak into the next invocation
    assert runner.invoke(app, ["guard", "diff", g, g]).exit_code == 3


def test_installed_console_script(tmp_path):
    """The `freezeasguard` executable pip installs (not `python -m`): it starts, lists every command, exits 0."""
    import os
    import shutil
    from pathlib import Path

    import freezeasguard

    script = Path(sys.executable).parent / "freezeasguard"
    script = script if script.exists() else Path(shutil.which("freezeasguard") or "")
    assert script.is_file(), "the console script is not installed (pip install -e .)"
    src = str(Path(freezeasguard.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    for command in ("info", "sample", "tiny", "finetune", "learn", "inspect", "verify", "demo", "bench", "guard", "zoo"):
        assert f" {command} " in proc.stdout, command
    proc = subprocess.run([str(script), "guard", "random", "--ratio", "2"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2 and "--ratio" in proc.stderr


def test_a_clean_run_prints_no_library_noise(tiny_dir, tmp_path):
    """diffusers imports CLIP's and SigLIP's image processors; without torchvision transformers printed a
    fallback note for each on every run that samples. Checked without the CLI's environment settings: the
    library itself must be quiet, and other transformers warnings must still show."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    code = ("import freezeasguard\n"
            "from diffusers import StableDiffusionPipeline\n"
            "from transformers.utils import logging\n"
            "logging.get_logger('transformers.utils.import_utils').warning('another warning')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stderr and "another warning" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "freezeasguard", "sample", "-p", "a red cat", "--model", str(tiny_dir),
                           "--n", "1", "--sampling-steps", "2", "--png", str(tmp_path / "g.png")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_guard_top_freezes_the_highest_scores_within_the_budget(tmp_path, tiny_dir):
    from freezeasguard.guard import Guard
    from freezeasguard.model import DiffusionModel

    sizes = {n: p.numel() for n, p in DiffusionModel.from_pretrained(tiny_dir).unet.named_parameters()}
    # score = rank by name: the highest names first, so the expected set is computable independently
    names = sorted(sizes)
    (tmp_path / "scores.json").write_text(json.dumps({n: float(i) for i, n in enumerate(names)}))
    result = runner.invoke(app, ["guard", "top", str(tmp_path / "scores.json"), "--model", str(tiny_dir),
                                 "--ratio", "0.25", "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    g = Guard.load(tmp_path / "g" / "guard.json")
    budget, taken, want = 0.25 * sum(sizes.values()), 0, set()
    for n in reversed(names):  # greedy in score order: every tensor that still fits
        if taken + sizes[n] <= budget:
            want.add(n)
            taken += sizes[n]
    assert set(g.frozen) == want and g.ratio_by_params <= 0.25


def test_the_api_and_the_cli_freeze_the_same_tensors_for_the_same_ratio(tiny_dir, tmp_path):
    """One unit and one default for the ratio everywhere: Guard.random(unet, 0.3) and `guard random --ratio
    0.3` freeze the same tensors (both count parameters unless told otherwise)."""
    from freezeasguard.configs import RATIO_BY_DEFAULT
    from freezeasguard.guard import Guard
    from freezeasguard.model import DiffusionModel

    result = runner.invoke(app, ["guard", "random", "--ratio", "0.3", "--model", str(tiny_dir), "--out",
                                 str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    cli = Guard.load(tmp_path / "g" / "guard.json")
    api = Guard.random(DiffusionModel.from_pretrained(tiny_dir).unet, 0.3)
    assert cli.frozen == api.frozen and RATIO_BY_DEFAULT == "params"
    by_count = Guard.random(DiffusionModel.from_pretrained(tiny_dir).unet, 0.3, ratio_by="count")
    assert by_count.frozen != api.frozen  # the unit matters, so a single default matters
