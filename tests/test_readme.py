"""The README's commands, as written, in the order a reader meets them (in a fresh folder holding `photos/` and a
link to `conf/`). The only changes are step caps: `cod fit` gets `--trainer.max_steps 2`, `cod demo --train`
3 steps, `cod fit-prior` 3 steps, and `cod diffc compress` one step (`--steps 1` for its rate). Commands that need files a fresh machine does not have are listed in NEEDS_DOWNLOADS and skipped."""
from __future__ import annotations

import re
import shlex
import shutil

import pytest

from cod.cli import main
from conftest import KODAK, ROOT, require

NEEDS_DOWNLOADS = ("conf/pixel.yaml",      # ImageNet and the DINOv2 weights
                   "import-official")      # the release's checkpoints


def readme_steps() -> list[tuple[str, str]]:
    """("cod", command) and ("python", code) in README order, from its bash, console and python blocks."""
    text = (ROOT / "README.md").read_text()
    steps = []
    for lang, body in re.findall(r"```(bash|console|python)\n(.*?)```", text, flags=re.S):
        if lang == "python":
            steps.append(("python", body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if "&&" in line:
                line = line.split("&&", 1)[1].strip()  # "pip install ... && cod demo": the install is the venv's
            if line.startswith("cod "):
                steps.append(("cod", line))
    return steps


def capped(command: str) -> list[str]:
    args = shlex.split(command)[1:]
    if args[0] == "fit":
        args += ["--trainer.max_steps", "2"]
    if args[0] == "demo" and "--train" in args:
        args.insert(args.index("--train") + 1, "3")
    if args[0] == "fit-prior":
        args += ["--steps", "3"]
    if args[:2] == ["diffc", "compress"]:
        for option in ("--bpp", "--steps", "--recon-t"):
            if option in args:
                del args[args.index(option):args.index(option) + 2]
        args += ["--steps", "1"]
    return args


def test_the_readme_lists_the_commands_this_test_runs():
    commands = [c for kind, c in readme_steps() if kind == "cod"]
    assert commands[0] == "cod demo"  # the main job comes first
    for expected in ("cod fit --config conf/tiny.yaml", "cod compress --model tiny photos/ -o out",
                     "cod demo --train --out cod-demo-train"):
        assert expected in commands


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    require(KODAK)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for name in ("kodim01.png", "kodim04.png"):
        shutil.copy(KODAK / name, tmp_path / "photos" / name)
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    ran = []
    for kind, step in readme_steps():
        if kind == "python":
            exec(compile(step, "README.md", "exec"), {})
            continue
        if any(marker in step for marker in NEEDS_DOWNLOADS):
            continue
        code = main(capped(step))
        out = capsys.readouterr()
        assert code == 0, (step, out.err[-2000:])
        assert "Traceback" not in out.err, step
        ran.append(step)
    assert len(ran) >= 10, ran
    assert (tmp_path / "cod-demo" / "demo.png").is_file() and (tmp_path / "rec" / "kodim01.png").is_file()
    assert (tmp_path / "runs" / "tiny" / "model" / "model.safetensors").is_file()
