"""`cod compress / decompress / evaluate` end to end: any size, batch = single, determinism, the official
format, and every class of bad input ending in one clear message, a non-zero exit and no output file."""
from __future__ import annotations

import json

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
from conftest import KODAK, fixture_manifest, fixture_tensors, require

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


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im)


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


def test_batches_give_the_same_files_and_decoding_is_deterministic(model_dir, tmp_path):
    # three images of one padded size (64x96) and one of another: a batch of 3 and a batch of 1
    paths = [save(tmp_path / f"img{i}.png", rand_image(40 + 8 * i, 70, seed=i)) for i in range(3)]
    paths.append(save(tmp_path / "small.png", rand_image(5, 9, seed=3)))
    assert main(["-q", "compress", "--model", str(model_dir), *map(str, paths), "-o", str(tmp_path / "batch"),
                 "--batch-size", "3"] + STEPS) == 0
    for p in paths:
        assert main(["-q", "compress", "--model", str(model_dir), str(p), "-o", str(tmp_path / "single")] + STEPS) == 0
        assert (tmp_path / "batch" / f"{p.stem}.cod").read_bytes() == (tmp_path / "single" / f"{p.stem}.cod").read_bytes()
    assert main(["-q", "decompress", "--model", str(model_dir), str(tmp_path / "batch"), "-o", str(tmp_path / "d4"),
                 "--batch-size", "4"]) == 0
    for p in paths:
        assert main(["-q", "decompress", "--model", str(model_dir), str(tmp_path / "single" / f"{p.stem}.cod"),
                     "-o", str(tmp_path / "d1")]) == 0
        batched, single = pixels(tmp_path / "d4" / f"{p.stem}.png"), pixels(tmp_path / "d1" / f"{p.stem}.png")
        assert batched.shape == single.shape == pixels(p).shape
        assert np.abs(batched.astype(int) - single).max() <= 1  # batched sums may round a rare pixel differently
    assert main(["-q", "decompress", "--model", str(model_dir), str(tmp_path / "single" / "img1.cod"),
                 "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "d1" / "img1.png"))


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
        (["compress", "--model", str(model_dir), str(good), "--cfg", "1e6"], "guidance scale"),
        (["compress", "--model", str(model_dir), str(tmp_path / "text.png"), "--format", "official"], "text.png"),
        (["compress", "--model", str(model_dir), str(save(tmp_path / "odd.png", rand_image(17, 17))),
          "--format", "official"], "cannot restore a 17x17 image"),
        (["decompress", "--model", str(model_dir), str(tmp_path / "good.cod"), "--format", "official"],
         "official file"),
    ]
    for i, (argv, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(argv + ["-o", str(out)]) == 1, argv
        err = capsys.readouterr().err
        assert err.count("cod: error:") == 1 and message in err and "Traceback" not in err, (argv, err)
        assert not out.exists() or not any(out.iterdir()), argv
    for argv in (["--steps", "0"], ["--steps", "-3"], ["--sampler", "heun"], ["--sampler", "euler_sde"],
                 ["--batch-size", "0"], ["--seed", "-1"], ["--seed", str(1 << 70)]):
        with pytest.raises(SystemExit) as e:  # argparse: usage line + one error line, exit status 2
            main(["compress", "--model", str(model_dir), str(good), "-o", str(tmp_path / "o")] + argv)
        assert e.value.code == 2 and argv[0] in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_one_bad_input_among_several_is_named_and_gets_no_output(model_dir, tmp_path, capsys):
    images = [save(tmp_path / f"{name}.png", rand_image(30, 40, seed=i)) for i, name in enumerate("ac")]
    (tmp_path / "b.png").write_text("not an image")
    out = tmp_path / "out"
    assert main(["compress", "--model", str(model_dir), str(images[0]), str(tmp_path / "b.png"), str(images[1]),
                 "-o", str(out), "--batch-size", "2"] + STEPS) == 1
    err = capsys.readouterr().err
    assert err.count("cod: error:") == 1 and "1 of 3 inputs failed" in err and "b.png: cannot read image" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.cod", "c.cod"]  # no b.cod, no temporary files
    (out / "c.cod").write_bytes((out / "c.cod").read_bytes()[:-1])
    assert main(["decompress", "--model", str(model_dir), str(out), "-o", str(tmp_path / "dec")]) == 1
    err = capsys.readouterr().err
    assert err.count("cod: error:") == 1 and "c.cod: file is truncated" in err
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["a.png"]


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
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["cod", "jpeg", "webp", "avif"] and summary["cod"]["images"] == 1
    for flag, expected in (("--lpips-weights", "alexnet-owt-7be5be79.pth"), ("--dists-weights", "vgg16-397923af.pth"),
                           ("--inception-weights", "torch-fidelity")):
        assert main(["evaluate", "--model", str(model_dir), str(src), flag, str(tmp_path / "no.pth"),
                     "--out-dir", str(tmp_path / "e2")]) == 1
        err = capsys.readouterr().err
        assert err.count("cod: error:") == 1 and expected in err
    assert not (tmp_path / "e2").exists()
