"""`cod export`: TorchScript and ONNX graphs reproduce the eager model (indices exactly)."""
from __future__ import annotations

import json

import pytest

from cod.cli import main


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_graphs_match_eager(tmp_path, fmt):
    model_dir, out = tmp_path / "m", tmp_path / "export"
    assert main(["-q", "new-model", "--preset", "tiny-pixel", "--out", str(model_dir)]) == 0
    assert main(["-q", "export", "--model", str(model_dir), "--out", str(out), "--format", fmt,
                 "--height", "64", "--width", "96"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"encoder", "decoder", "step"}
    assert manifest["graphs"]["encoder"]["max_abs_err_vs_eager"] == 0
    assert manifest["graphs"]["decoder"]["output_shape"] == [1, 64, 4, 6]
    for graph in manifest["graphs"].values():
        assert (out / graph["file"]).is_file()
        assert graph["max_abs_err_vs_eager"] < 1e-4


def test_export_refuses_sizes_the_model_cannot_code(tmp_path, capsys):
    model_dir = tmp_path / "m"
    assert main(["-q", "new-model", "--preset", "tiny-pixel", "--out", str(model_dir)]) == 0
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "e"), "--height", "50"]) == 1
    assert "multiples of 32" in capsys.readouterr().err
