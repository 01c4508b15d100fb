"""`cod evaluate`'s pieces: classical anchors searched to the CoD file size (or honestly unmatched), metrics
that are NaN where undefined and null in JSON, and perceptual backbones read from local files only."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from cod.codec import evaluate as ev


def photo_like(h, w):
    """A smooth image with some texture, so that codec sizes grow steadily with quality."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    noise = np.random.default_rng(0).normal(0, 12, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("codec", sorted(ev.ANCHORS))
def test_anchor_is_the_largest_file_not_above_the_target(codec):
    image = photo_like(96, 128)
    smallest = len(ev.encode_anchor(image, codec, ev.ANCHORS[codec][1]))
    target = smallest + 1500
    a = ev.matched_anchor(image, codec, target)
    assert a["matched"] and a["bytes"] <= target and a["recon"].shape == image.shape
    if a["quality"] < ev.ANCHORS[codec][2]:  # one quality step up would not fit
        assert len(ev.encode_anchor(image, codec, a["quality"] + 1)) > target
    tiny = ev.matched_anchor(image, codec, 10)  # CoD-like target: no classical codec gets there
    assert not tiny["matched"] and tiny["bytes"] == smallest and tiny["quality"] == ev.ANCHORS[codec][1]


def test_metrics_and_reports(tmp_path):
    image = photo_like(ev.MS_SSIM_MIN_SIDE, 200)
    noisy = np.clip(image.astype(int) + 4, 0, 255).astype(np.uint8)
    assert ev.psnr(image, image) == float("inf") and 35 < ev.psnr(image, noisy) < 37
    assert 0.9 < ev.ms_ssim(image, noisy) <= 1.0
    assert np.isnan(ev.ms_ssim(image[:-1], noisy[:-1]))  # too small for 5 scales
    rows = [{"image": "a", "method": "cod", "bpp_file": 0.01, "bpp_payload": 0.009, "psnr": 20.0,
             "ms_ssim": float("nan"), "matched": True, "quality": ""},
            {"image": "b", "method": "cod", "bpp_file": 0.03, "bpp_payload": 0.027, "psnr": 30.0,
             "ms_ssim": 0.5, "matched": True, "quality": ""}]
    summary = ev.summarize(rows)
    assert summary["cod"] == {"images": 2, "all_matched": True, "bpp_file": 0.02, "bpp_payload": 0.018,
                              "psnr": 25.0, "ms_ssim": 0.5}
    ev.write_reports(rows, summary, tmp_path)
    assert json.loads((tmp_path / "per_image.json").read_text())[0]["ms_ssim"] is None  # strict JSON: no NaN
    assert (tmp_path / "per_image.csv").read_text().splitlines()[0] == \
        "image,method,bpp_file,bpp_payload,psnr,ms_ssim,matched,quality"


def test_perceptual_backbones_come_from_local_files_only(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        ev.PerceptualMetric("lpips", tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="cannot load it as the DISTS backbone") as e:
        ev.PerceptualMetric("dists", tmp_path / "junk.pth")
    assert "\n" not in str(e.value)
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alexnet-random.pth")  # any name will do
    lpips = ev.PerceptualMetric("lpips", tmp_path / "alexnet-random.pth")
    image = photo_like(64, 64)
    assert lpips(image, image) == 0.0 and lpips(image, 255 - image) > 0
