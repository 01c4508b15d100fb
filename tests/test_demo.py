"""`cod demo`, the main job: its figures are the README's, and the same on a busy machine as on a quiet one
(the work is fixed, and it runs on one thread); `--train` trains for exactly the steps asked."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from cod.cli import main
from conftest import ROOT

FIGURES = re.compile(r"On average over the four photos: ([\d.]+) bpp, ([\d.]+) dB PSNR, MS-SSIM ([\d.]+)")


def run_demo(out) -> dict:
    result = subprocess.run([sys.executable, "-m", "cod", "demo", "--out", str(out)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    report.pop("seconds_total")
    return report


@pytest.mark.slow
def test_the_figures_are_the_readmes_on_a_busy_machine_too(tmp_path):
    quiet = run_demo(tmp_path / "quiet")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = run_demo(tmp_path / "busy")
    finally:
        for p in busy:
            p.kill()
    assert loaded == quiet
    for cod_file in (tmp_path / "quiet").glob("*.cod"):
        assert (tmp_path / "busy" / cod_file.name).read_bytes() == cod_file.read_bytes()
    bpp, psnr, ms_ssim = map(float, FIGURES.search((ROOT / "README.md").read_text()).groups())
    means = quiet["means"]
    assert round(means["cod_bpp"], 4) == bpp and round(means["cod_psnr"], 2) == psnr
    assert round(means["cod_ms_ssim"], 3) == ms_ssim


def test_an_earlier_demo_is_not_replaced(tmp_path, capsys):
    (tmp_path / "cod-demo").mkdir()
    (tmp_path / "cod-demo" / "mine.txt").write_text("keep")
    assert main(["demo", "--out", str(tmp_path / "cod-demo")]) == 1
    err = capsys.readouterr().err
    assert err.count("cod: error:") == 1 and "--overwrite" in err
    assert (tmp_path / "cod-demo" / "mine.txt").read_text() == "keep"


def test_train_runs_exactly_the_steps_asked(tmp_path):
    assert main(["-q", "demo", "--train", "4", "--out", str(tmp_path / "t")]) == 0
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert "4 steps" in report["model"]
    card = (tmp_path / "t" / "model" / "MODEL_CARD.md").read_text()
    assert "step 4" in card
