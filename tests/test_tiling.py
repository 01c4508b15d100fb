"""Tiled sampling (cod.diffusion.tiling): windows cover the image on the token grid, blending weights are a
partition of unity, a tile that covers the image is the whole-image decode exactly, and smaller tiles stay close to
it on the trained demo model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cod
from cod.demo import embedded_model_dir
from cod.diffusion.tiling import AUTO_ABOVE_PIXELS, TiledDenoiser, Tiling, axis_weights, parse_tile, tiling_for
from conftest import KODAK, require


@pytest.mark.parametrize("n, tile, overlap, multiple", [(48, 16, 4, 4), (50, 16, 4, 2), (64, 64, 8, 16),
                                                        (20, 32, 8, 4), (33, 8, 0, 1), (96, 32, 16, 16)])
def test_windows_cover_the_axis_on_the_token_grid(n, tile, overlap, multiple):
    starts = Tiling(tile, overlap).starts(n, multiple)
    size = min(tile, n)
    assert starts[0] == 0 and starts[-1] + size == n - n % multiple or starts == [0]
    assert all(s % multiple == 0 for s in starts) and starts == sorted(set(starts))
    covered = np.zeros(n, bool)
    for s in starts:
        covered[s:s + size] = True
    assert covered[: n - n % multiple].all()
    if len(starts) > 1:  # neighbours overlap by at least `overlap`, and no window is needless
        assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))
        assert starts[-2] + size < n - n % multiple


def test_weights_are_a_partition_of_unity_where_windows_overlap_exactly():
    n, tile, overlap = 56, 32, 8  # windows at 0 and 24: they share exactly 8 cells
    assert Tiling(tile, overlap).starts(n, 8) == [0, 24]
    total = torch.zeros(n, dtype=torch.float64)
    total[0:32] += axis_weights(0, 32, n, overlap)
    total[24:56] += axis_weights(24, 32, n, overlap)
    assert torch.allclose(total, torch.ones(n, dtype=torch.float64), atol=1e-12)
    w = axis_weights(24, 32, n, overlap)
    assert (w > 0).all() and w[-1] == 1 and w[0] < 0.05  # the image border is never faded


def _local_net(calls):
    """A denoiser whose velocity at a cell depends on that cell's x and condition token only: tiling must then
    give the whole-image velocity up to the rounding of the blend."""
    def net(x, t, y=None, cond=None):
        calls.append(tuple(x.shape[-2:]))
        up = cond.mean(1, keepdim=True).repeat_interleave(4, -2).repeat_interleave(4, -1)
        return torch.sin(3 * x) * t.view(-1, 1, 1, 1) + up, cond
    return net


def test_tiled_blend_of_a_local_net_equals_the_whole_image():
    torch.manual_seed(0)
    x, cond, t = torch.randn(2, 3, 40, 56), torch.randn(2, 5, 10, 14), torch.tensor([0.3, 0.7])
    calls = []
    whole, _ = _local_net([])(x, t, cond=cond)
    tiled, out_cond = TiledDenoiser(_local_net(calls), Tiling(16, 8), 4)(x, t, cond=cond)
    assert out_cond is cond
    assert len(calls) == 4 * 6 and set(calls) == {(16, 16)}  # every call is one window: attention is bounded
    assert (tiled - whole).abs().max() < 1e-5


def test_a_tile_that_covers_the_image_is_the_plain_call():
    x, cond, t = torch.randn(1, 3, 32, 48), torch.randn(1, 5, 8, 12), torch.tensor([0.5])
    calls = []
    tiled, _ = TiledDenoiser(_local_net(calls), Tiling(48, 8), 4)(x, t, cond=cond)
    assert calls == [(32, 48)] and torch.equal(tiled, _local_net([])(x, t, cond=cond)[0])
    with pytest.raises(ValueError, match="condition map"):
        TiledDenoiser(_local_net([]), Tiling(16, 4), 4)(x, t, y=x)


def test_tile_options():
    assert parse_tile("AUTO") == "auto" and parse_tile("off") == "off" and parse_tile("512") == 512
    for bad in ("0", "-16", "big", 0, True, 1.5, None):
        with pytest.raises(ValueError, match="tile must be"):
            parse_tile(bad)
    assert tiling_for("auto", 2048, 2048, 1, 16) is None  # 4 MP: decoded whole
    assert tiling_for("auto", 2048, 2064, 1, 16) == Tiling(512, 128)
    assert 2048 * 2064 > AUTO_ABOVE_PIXELS
    assert tiling_for(100, 256, 256, 1, 16) == Tiling(96, 16)  # whole tokens, overlap a quarter of the tile
    assert tiling_for(16, 256, 256, 1, 16) == Tiling(16, 0)
    assert tiling_for(512, 512, 256, 1, 16) is None and tiling_for("off", 9999, 9999, 1, 16) is None
    assert tiling_for(128, 512, 512, 8, 2, overlap=32) == Tiling(16, 4)  # latent: 8 pixels per cell, 2 per token
    with pytest.raises(ValueError):
        cod.load(embedded_model_dir(), tile="everywhere")


@pytest.fixture(scope="module")
def demo():
    from cod.images import read_image

    model = cod.load(embedded_model_dir())
    image = read_image(require(KODAK) / "kodim23.png", 10 ** 7)[128:384, 128:512]  # 256x384
    x = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(255)[None]
    return model, image, model.encode(x)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_decode_with_a_covering_tile_equals_the_whole_image_decode(demo):
    model, _, idx = demo
    whole = model.decode(idx, 256, 384, tile="off")
    assert torch.equal(model.decode(idx, 256, 384, tile=384), whole)
    assert torch.equal(model.decode(idx, 256, 384), whole)  # "auto" below 4 MP: whole
    model.tile = 384
    try:
        assert torch.equal(model.decode(idx, 256, 384), whole)
    finally:
        model.tile = "auto"


def test_decode_with_small_tiles_stays_close_to_the_whole_image(demo):
    """The demo model (trained), one 256x384 Kodak crop: 128-pixel windows (6 x 4 calls at 32-pixel overlap) move
    give a decode 35.3 dB PSNR from the whole-image one, and 0.01 dB lower PSNR against the original (measured;
    the bounds leave a margin). docs/precision.md has the Kodak figures."""
    model, image, idx = demo
    whole = model.decode(idx, 256, 384, tile="off")[0].permute(1, 2, 0).numpy()
    tiled = model.decode(idx, 256, 384, tile=128)[0].permute(1, 2, 0).numpy()
    assert not np.array_equal(tiled, whole)
    assert psnr(tiled, whole) > 33
    assert psnr(tiled, image) > psnr(whole, image) - 0.3


def test_cli_tile_option(tmp_path, demo, capsys):
    from cod.cli import main
    from cod.images import read_image, write_png

    _, image, _ = demo
    write_png(tmp_path / "a.png", image[:64, :128])
    model = str(embedded_model_dir())
    assert main(["-q", "compress", "--model", model, str(tmp_path / "a.png"), "-o", str(tmp_path / "a.cod")]) == 0
    outs = {}
    for tile in ("off", "128", "32"):
        out = tmp_path / f"{tile}.png"
        assert main(["-q", "decompress", "--model", model, str(tmp_path / "a.cod"), "-o", str(out),
                     "--tile", tile]) == 0
        outs[tile] = read_image(out, 10 ** 6)
    assert np.array_equal(outs["128"], outs["off"]) and not np.array_equal(outs["32"], outs["off"])
    with pytest.raises(SystemExit) as e:
        main(["decompress", "--model", model, str(tmp_path / "a.cod"), "-o", str(tmp_path / "b.png"), "--tile", "x"])
    assert e.value.code == 2 and "tile must be" in capsys.readouterr().err


def test_reconstruct_tiles_too(demo):
    """The evaluate path (the codec's forward gives the condition map) computes the map once, then windows crop it."""
    model, image, _ = demo
    x = torch.from_numpy(image[:128, :256].copy()).permute(2, 0, 1).float().div(255)[None]
    whole = model.reconstruct(x, tile="off")
    assert torch.equal(model.reconstruct(x, tile=256), whole)
    tiled = model.reconstruct(x, tile=64)
    assert not torch.equal(tiled, whole)
    assert psnr(tiled[0].permute(1, 2, 0).numpy(), whole[0].permute(1, 2, 0).numpy()) > 30
