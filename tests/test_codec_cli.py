"""`cod compress / decompress / evaluate` end to end: any size, batch = single, determinism, the official
format, and every class of bad input ending in one clear message, a non-zero exit and no output file."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import cod
from cod.cli import main
from cod.compat.fill_rule import apply_fill_rule
from cod.model import CoDModel, build_config
from cod.models.pixnerdit import PixNerDiT
from cod.models.presets import Preset
from conftest import KODAK, condition_from_u8, fixture_manifest, fixture_tensors, require

STEPS = ["--steps", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "tiny"
    assert main(["-q", "new-model", "--preset", "tiny-pixel", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "tiny-seed1"
    assert main(["-q", "new-model", "--preset", "tiny-pixel", "--seed", "1", "--out", str(out)]) == 0
    return out


def save(path, array, **kw):
    Image.fromarray(array).save(path, **kw)
    return path


def rand_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h,w", [(1, 1), (17, 513), (3000, 20)])
def test_round_trip_restores_the_exact_size(model_dir, tmp_path, h, w):
    src = save(tmp_path / "in.png", rand_image(h, w))
    assert main(["-q", "compress", "--model", str(model_dir), str(src), "-o", str(tmp_path / "x.cod")] + STEPS) == 0
    assert main(["-q", "decompress", "--model", str(model_dir), str(tmp_path / "x.cod"),
                 "-o", str(tmp_path / "out.png")]) == 0
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (w, h) and im.mode == "RGB"


def test_full_size_portrait_kodak_round_trip(model_dir, tmp_path):
    src = require(KODAK / "kodim04.png")
    assert main(["-q", "compress", "--model", str(model_dir), str(src), "-o", str(tmp_path / "k.cod"),
                 "--steps", "1"]) == 0
    data = (tmp_path / "k.cod").read_bytes()
    assert len(data) == 6 + 5 + 16 * 24 // 2  # 6-byte header, 5 bytes of decode parameters, 4-bit indices
    assert main(["-q", "decompress", "--model", str(model_dir), str(tmp_path / "k.cod"), "-o", str(tmp_path)]) == 0
    with Image.open(tmp_path / "k.png") as im:
        assert im.size == (512, 768)


def test_batch_equals_single_and_decode_is_deterministic(model_dir, tmp_path):
    paths = [save(tmp_path / f"img{i}.png", rand_image(40 + 8 * i, 70, seed=i)) for i in range(3)]
    assert main(["-q", "compress", "--model", str(model_dir), *map(str, paths), "-o", str(tmp_path / "batch")]
                + STEPS) == 0
    for p in paths:
        assert main(["-q", "compress", "--model", str(model_dir), str(p), "-o", str(tmp_path / "single")]
                    + STEPS) == 0
        assert (tmp_path / "batch" / f"{p.stem}.cod").read_bytes() == (tmp_path / "single" / f"{p.stem}.cod").read_bytes()
    model = cod.load(model_dir)
    data = (tmp_path / "batch" / "img1.cod").read_bytes()
    first, second = model.decompress(data), model.decompress(data)
    assert first.shape == (48, 70, 3) and np.array_equal(first, second)


def test_python_api_accepts_arrays_pil_and_tensors(model_dir):
    model = cod.load(model_dir)
    img = rand_image(33, 65)
    a = model.compress([img, Image.fromarray(img), torch.from_numpy(img).permute(2, 0, 1)], steps=2)
    assert a[0] == a[1] == a[2]
    assert model.decompress(a[0]).shape == (33, 65, 3)


def test_image_modes_are_normalised_to_rgb(tmp_path):
    from cod.codec.images import read_image

    rgb = rand_image(20, 30)
    assert read_image(save(tmp_path / "g.png", rgb[..., 0])).shape == (20, 30, 3)
    gray16 = (rgb[..., 0].astype(np.uint16) * 257)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert np.array_equal(read_image(tmp_path / "g16.png")[..., 0], rgb[..., 0])
    with pytest.warns(UserWarning, match="alpha"):
        out = read_image(save(tmp_path / "a.png", np.dstack([rgb, np.full((20, 30), 128, np.uint8)])))
    assert np.array_equal(out, rgb)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.tiff")
    Image.fromarray(rgb).save(tmp_path / "w.webp", lossless=True)
    for name in ("p.png", "c.tiff", "w.webp"):
        assert read_image(tmp_path / name).shape == (20, 30, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rgb).save(tmp_path / "o.jpg", exif=exif)
    assert read_image(tmp_path / "o.jpg").shape == (30, 20, 3)


def test_bad_inputs_fail_cleanly_without_outputs(model_dir, other_model_dir, tmp_path, capsys):
    good = save(tmp_path / "good.png", rand_image(32, 32))
    assert main(["-q", "compress", "--model", str(model_dir), str(good), "-o", str(tmp_path / "good.cod")]) == 0
    data = (tmp_path / "good.cod").read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "trunc.cod").write_bytes(data[:-2])
    corrupt = bytearray(data)
    corrupt[-1] ^= 0x01
    (tmp_path / "corrupt.cod").write_bytes(bytes(corrupt))
    cases = [
        (["compress", "--model", str(model_dir), str(tmp_path / "text.png")], "cannot read image"),
        (["compress", "--model", str(model_dir), str(tmp_path / "empty.png")], "empty file"),
        (["compress", "--model", str(model_dir), str(tmp_path / "missing.png")], "no such file"),
        (["decompress", "--model", str(model_dir), str(tmp_path / "trunc.cod")], "truncated"),
        (["decompress", "--model", str(model_dir), str(tmp_path / "corrupt.cod")], "integrity"),
        (["decompress", "--model", str(other_model_dir), str(tmp_path / "good.cod")], "another model"),
        (["decompress", "--model", str(tmp_path / "nomodel"), str(tmp_path / "good.cod")], "does not exist"),
        (["compress", "--model", str(model_dir), str(good), "--device", "cuda:7"], "CUDA"),
    ]
    for i, (argv, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(argv + ["-o", str(out)]) == 1, argv
        err = capsys.readouterr().err
        assert err.count("cod: error:") == 1 and message in err and "Traceback" not in err, (argv, err)
        assert not out.exists() or not any(out.iterdir()), argv
    for argv in (["--steps", "0"], ["--sampler", "heun"]):
        with pytest.raises(SystemExit) as e:
            main(["compress", "--model", str(model_dir), str(good), "-o", str(tmp_path / "o")] + argv)
        assert e.value.code == 2


def fixture_model(tmp_path):
    m = fixture_manifest("pixel_ds32_up2x")
    denoiser = apply_fill_rule(PixNerDiT(**m["constructor_kwargs"])).eval()
    preset = Preset("pixel", {**m["constructor_kwargs"], "encoder_width": 128}, "fixture")
    model = CoDModel(build_config(preset, None, sampling={"steps": 4}), denoiser)
    model.save(tmp_path / "fixture-model")
    return tmp_path / "fixture-model"


def test_official_format_files_from_the_fixtures_decode(tmp_path):
    T = fixture_tensors("pixel_ds32_up2x")
    model_dir = fixture_model(tmp_path)
    (tmp_path / "sq.cod").write_bytes(bytes(T["codec.cod_file"].tolist()))
    (tmp_path / "rect.cod").write_bytes(bytes(T["rect.cod_file"].tolist()))
    assert main(["-q", "decompress", "--model", str(model_dir), "--format", "official",
                 str(tmp_path / "sq.cod"), str(tmp_path / "rect.cod"), "-o", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "rect.png") as im:
        assert im.size == (192, 128)  # 128 rows x 192 columns: the official tool would transpose it
    sample = T["sample.adam2.decompress"][0]
    expected = torch.clamp((sample.to(torch.bfloat16).float() + 1) * 127.5 + 0.5, 0, 255).to(torch.uint8)
    decoded = np.asarray(Image.open(tmp_path / "out" / "sq.png"))
    assert np.abs(decoded.astype(int) - expected.permute(1, 2, 0).numpy().astype(int)).max() <= 1
    # and our official-format writer reproduces the release's bytes
    y = T["in.y_u8"][0].permute(1, 2, 0).numpy()
    assert cod.load(model_dir).compress([y], fmt="official")[0] == bytes(T["codec.cod_file"].tolist())


def test_evaluate_writes_reports(model_dir, tmp_path, capsys):
    src = save(tmp_path / "e.png", rand_image(64, 96))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model_dir), str(src), "--out-dir", str(out)] + STEPS) == 0
    rows = json.loads((out / "per_image.json").read_text())
    assert [r["method"] for r in rows] == ["cod", "jpeg", "webp", "avif"]
    cod_row = rows[0]
    assert cod_row["bytes"] == 5 + 5 + 6 // 2 and cod_row["bpp_file"] == pytest.approx(8 * cod_row["bytes"] / (64 * 96))
    assert all(r["bytes"] <= cod_row["bytes"] or not r["matched"] for r in rows[1:])
    header = (out / "per_image.csv").read_text().splitlines()[0]
    assert header.startswith("image,method,height,width,bytes,bpp_file,bpp_payload,psnr,ms_ssim")
    assert (out / "rd.png").read_bytes()[:4] == b"\x89PNG"
    assert "LPIPS not computed" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(model_dir), str(src), "--lpips-weights", str(tmp_path / "no.pth"),
                 "--out-dir", str(tmp_path / "e2")]) == 1
    assert "alexnet-owt-7be5be79.pth" in capsys.readouterr().err
