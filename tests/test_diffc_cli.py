"""`cod diffc compress / decompress / evaluate`: round trip through files, the codec's conventions (no silent
overwrite, one `cod: error:` line, rate options), and the evaluation reports."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cod
from cod.cli import main
from cod.diffc import codec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()  # see tests/test_diffc_codec.py
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffc-cli")
    cod.new_model("tiny-pixel", root / "model")
    for name, (h, w, seed) in {"a": (32, 40, 0), "b": (32, 32, 1)}.items():
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root


def one_error(capsys, *parts):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cod: error:"), err
    for part in parts:
        assert part in err[0], err[0]


def test_compress_then_decompress_gives_the_api_image(workdir, capsys):
    out, png = workdir / "out", workdir / "png"
    assert main(["diffc", "compress", "--model", str(workdir / "model"), "--steps", "3", str(workdir / "a.png"),
                 str(workdir / "b.png"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "step 3/3" in err  # progress per step
    assert main(["diffc", "decompress", "--model", str(workdir / "model"), str(out), "-o", str(png), "-q"]) == 0
    model = cod.load(workdir / "model")
    data = (out / "a.cod").read_bytes()
    assert codec.parse(model, data).fields.steps == 3
    decoded = np.array(Image.open(png / "a.png"))
    assert decoded.shape == (32, 40, 3) and np.array_equal(decoded, codec.decompress(model, data))


def test_conventions(workdir, capsys):
    model, a = str(workdir / "model"), str(workdir / "a.png")
    target = workdir / "one.cod"
    assert main(["diffc", "compress", "--model", model, "--recon-t", "950", a, "-o", str(target), "-q"]) == 0
    assert codec.parse(cod.load(model), target.read_bytes()).fields.steps == 2  # 972, 949 <= 950
    assert main(["diffc", "compress", "--model", model, "--steps", "1", a, "-o", str(target)]) == 1
    one_error(capsys, "exists already", "--overwrite")
    assert main(["diffc", "compress", "--model", model, "--steps", "1", a, "-o", str(target), "--overwrite",
                 "-q"]) == 0
    with pytest.raises(SystemExit) as e:
        main(["diffc", "compress", "--model", model, a, "-o", str(workdir / "x.cod")])
    assert e.value.code == 2
    one_error(capsys, "--bpp --steps --recon-t")
    assert main(["diffc", "compress", "--model", model, "--steps", "999", a, "-o", str(workdir / "x.cod")]) == 1
    one_error(capsys, "schedule has 160 steps")
    assert main(["decompress", "--model", model, str(target), "-o", str(workdir / "x.png")]) == 1
    one_error(capsys, "cod diffc decompress")
    assert main(["diffc", "decompress", "--model", model, a, "-o", str(workdir / "x.png")]) == 1  # not a .cod
    capsys.readouterr()
    assert main(["diffc", "compress", "--model", model, "--steps", "1", "--max-pixels", "100", a, "-o",
                 str(workdir / "big.cod")]) == 1
    one_error(capsys, "max-pixels")
    assert not (workdir / "big.cod").exists()


def test_evaluate_writes_the_sweep(workdir, capsys):
    out = workdir / "eval"
    assert main(["diffc", "evaluate", "--model", str(workdir / "model"), str(workdir / "b.png"), "--steps", "0,2",
                 "--out-dir", str(out)]) == 0
    rows = json.loads((out / "rd.json").read_text())
    assert [r["K"] for r in rows] == [0, 2] and rows[0]["bpp"] < rows[1]["bpp"]
    assert "PSNR" in capsys.readouterr().out
    assert main(["diffc", "evaluate", "--model", str(workdir / "model"), str(workdir / "b.png"), "--steps", "1",
                 "--out-dir", str(out)]) == 1
    one_error(capsys, "--overwrite")


def test_benchmark_script_runs(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out_json = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "tools/bench_diffc.py", "--preset", "tiny-pixel", "--size", "32",
                             "--count", "1", "--steps", "0,1", "--threads", "1", "--json", str(out_json)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(out_json.read_text())["sweep"]["summary"]
    assert [s["K"] for s in summary] == [0, 1]
