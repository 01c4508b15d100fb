"""A corpus of hostile inputs, each driven through the CLI (and the API where it has its own entry): crafted
bitstreams, images, model directories, outputs and environments. Every case must end in exactly one `cod: error:`
line naming the user's path, a non-zero exit, no traceback, nothing written, and quickly: no hang, no unbounded
allocation (the suite's memory and time would show a regression; there is no timing assertion).

The cases reproduce what a new user met (issue 8): a 131 KB file declaring 16384x16384 pixels, a 523-byte file
storing 256 steps, /dev/zero, FIFOs, `cod decompress photos -o photos` replacing the photos, a bit-flipped or
foreign weights file decoding to wrong pixels with exit 0, config fields that made decoding random or black.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import cod
from cod.cli import main
from cod.codec import api, container
from cod.codec.container import DecodeParams, Header
from cod.compat.official_format import write_official
from cod.errors import LimitError
from cod.limits import Limits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "tiny"
    assert main(["-q", "new-model", "--preset", "tiny-pixel", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    return cod.load(model_dir)


def rand_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save_png(path, array):
    Image.fromarray(array).save(path)
    return path


def one_error(capsys, *words, only_line: bool = True) -> str:
    """Exactly one `cod: error:` line naming `words` (and, unless only_line is False, nothing else on stderr:
    `cod fit` also prints Lightning's progress information there)."""
    err = capsys.readouterr().err
    assert err.count("cod: error:") == 1 and (err.count("\n") == 1 or not only_line), err
    assert "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def crafted_cod(model, height, width, params=None) -> bytes:
    """A file with a valid check byte (the check is public) declaring height x width."""
    payload = bytes(api.payload_size(model, height, width))
    return container.write(Header(height, width, container.model_tag(model.fingerprint), params=params), payload,
                           model.fingerprint)


def no_outputs(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# ---- bitstreams ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side,what,tile", [(16384, "megapixels", "auto"), (8192, "megapixels", "auto"),
                                            (4096, "TFLOP", "off")])
def test_huge_declared_sizes_are_refused_before_any_allocation(model, model_dir, tmp_path, capsys, side, what, tile):
    """(A tiled decode's work grows linearly with the area, so the work limit is what stops a whole-image decode
    of 4096x4096, whose attention is quadratic: tiling off.)"""
    src = tmp_path / f"big{side}.cod"
    src.write_bytes(crafted_cod(model, side, side))
    assert main(["decompress", "--model", str(model_dir), str(src), "-o", str(tmp_path / "out"), "--tile", tile]) == 1
    one_error(capsys, str(src), what, "--max-")
    assert no_outputs(tmp_path / "out")
    default, model.tile = model.tile, tile
    try:
        with pytest.raises(LimitError):
            api.decompress(model, src.read_bytes())
    finally:
        model.tile = default


def test_the_limits_can_be_raised(model, model_dir, tmp_path, capsys):
    src = tmp_path / "wide.cod"
    src.write_bytes(crafted_cod(model, 32, 4096))  # 131072 pixels
    assert main(["decompress", "--model", str(model_dir), str(src), "-o", str(tmp_path / "a"),
                 "--max-pixels", "100000"]) == 1
    one_error(capsys, "--max-pixels")
    assert main(["-q", "decompress", "--model", str(model_dir), str(src), "-o", str(tmp_path / "b"), "--steps", "1",
                 "--max-pixels", "200000"]) == 0
    assert Image.open(tmp_path / "b" / "wide.png").size == (4096, 32)


def test_a_small_file_storing_256_steps_is_refused(model, model_dir, tmp_path, capsys):
    src = tmp_path / "steps.cod"
    src.write_bytes(crafted_cod(model, 1024, 1024, DecodeParams("adam2", 256, 3.0, 0)))
    assert len(src.read_bytes()) < 600
    assert main(["decompress", "--model", str(model_dir), str(src), "-o", str(tmp_path / "out")]) == 1
    one_error(capsys, str(src), "256 sampling steps", "--max-steps")
    with pytest.raises(LimitError):
        api.decompress(model, src.read_bytes(), limits=Limits(max_steps=100))


def test_official_format_with_a_huge_header_is_refused(model, model_dir, tmp_path, capsys):
    src = tmp_path / "huge.cod"
    side = 65504  # a multiple of 32: passes the geometry check, then the pixel limit stops it
    src.write_bytes(write_official(bytes(api.payload_size(model, side, side)), side, side))
    assert main(["decompress", "--model", str(model_dir), "--format", "official", str(src),
                 "-o", str(tmp_path / "out")]) == 1
    one_error(capsys, str(src), "megapixels")


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "directory.cod", "dangling.cod", "sparse.cod"])
def test_non_regular_and_oversized_inputs_are_refused_without_reading(model_dir, tmp_path, special):
    """Run in a subprocess with a timeout: a regression here would hang (a FIFO) or read forever (/dev/zero)."""
    if special == "/dev/zero":
        src = "/dev/zero"
    elif special == "fifo":
        src = tmp_path / "pipe.cod"
        os.mkfifo(src)
    elif special == "directory.cod":
        src = tmp_path / "directory.cod"
        (src / "inner").mkdir(parents=True)
    elif special == "dangling.cod":
        src = tmp_path / "dangling.cod"
        src.symlink_to(tmp_path / "nowhere.cod")
    else:
        src = tmp_path / "sparse.cod"
        with open(src, "wb") as f:
            f.truncate(1 << 40)  # a 1 TiB sparse file
    out = subprocess.run([sys.executable, "-m", "cod", "decompress", "--model", str(model_dir), str(src),
                          "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("cod: error:") == 1 and "Traceback" not in out.stderr, out.stderr
    assert str(src) in out.stderr
    assert no_outputs(tmp_path / "out")


def test_one_bad_file_does_not_stop_the_others(model, model_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.cod").write_bytes(model.compress([rand_image(40, 50)], steps=1)[0])
    (folder / "b.cod").write_bytes(crafted_cod(model, 16384, 16384))
    (folder / "c.cod").write_bytes(b"\x00" * 10)
    (folder / "d.cod").write_bytes(model.compress([rand_image(30, 30, 1)], steps=1)[0])
    assert main(["decompress", "--model", str(model_dir), str(folder), "-o", str(tmp_path / "out")]) == 1
    one_error(capsys, "2 of 4 inputs failed", "b.cod", "c.cod")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "d.png"]


# ---- images --------------------------------------------------------------------------------------------------
def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height (its data is cut short): a decoder that trusted the header
    would allocate width * height * 3 bytes before noticing."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [20000, 8192])
def test_huge_images_are_refused_from_their_header(model_dir, tmp_path, capsys, side):
    src = png_header_only(tmp_path / f"huge{side}.png", side, side)
    ok = save_png(tmp_path / "ok.png", rand_image(20, 20))
    assert main(["compress", "--model", str(model_dir), str(src), str(ok), "-o", str(tmp_path / "out"),
                 "--steps", "1"]) == 1
    one_error(capsys, str(src), "megapixels", "--max-pixels")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.cod"]


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_special_files_as_images_are_refused(model_dir, tmp_path, special):
    src = "/dev/zero" if special == "/dev/zero" else tmp_path / "pipe.png"
    if special == "fifo":
        os.mkfifo(src)
    out = subprocess.run([sys.executable, "-m", "cod", "compress", "--model", str(model_dir), str(src),
                          "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.count("cod: error:") == 1 and "not a" in out.stderr, out.stderr
    assert no_outputs(tmp_path / "out")


# ---- outputs: never destroy data -------------------------------------------------------------------------------
def test_decompressing_next_to_the_originals_never_replaces_them(model_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    originals = {name: save_png(photos / f"{name}.png", rand_image(32, 48, i)).read_bytes()
                 for i, name in enumerate("ab")}
    assert main(["-q", "compress", "--model", str(model_dir), str(photos), "-o", str(photos), "--steps", "1"]) == 0
    assert main(["decompress", "--model", str(model_dir), str(photos), "-o", str(photos)]) == 1
    one_error(capsys, "exist", "--overwrite")
    assert {p.name: p.read_bytes() for p in photos.glob("*.png")} == {f"{k}.png": v for k, v in originals.items()}
    # --overwrite replaces only files cod wrote: not the photos ...
    assert main(["decompress", "--model", str(model_dir), str(photos / "a.cod"), "-o", str(photos / "a.png"),
                 "--overwrite"]) == 1
    one_error(capsys, "was not written by cod")
    assert (photos / "a.png").read_bytes() == originals["a"]
    # ... but its own earlier outputs, yes
    for _ in range(2):
        assert main(["-q", "decompress", "--model", str(model_dir), str(photos / "a.cod"), "-o",
                     str(tmp_path / "a.png"), "--overwrite"]) == 0
    # and an input is never an output, whatever the options
    assert main(["compress", "--model", str(model_dir), str(photos / "b.png"), "-o", str(photos / "b.png"),
                 "--overwrite"]) == 1
    one_error(capsys, "input")
    assert (photos / "b.png").read_bytes() == originals["b"]


def test_existing_outputs_are_refused_unless_overwrite(model_dir, tmp_path, capsys):
    src = save_png(tmp_path / "x.png", rand_image(32, 32))
    target = tmp_path / "x.cod"
    assert main(["-q", "compress", "--model", str(model_dir), str(src), "-o", str(target), "--steps", "1"]) == 0
    first = target.read_bytes()
    assert main(["compress", "--model", str(model_dir), str(src), "-o", str(target), "--steps", "2"]) == 1
    one_error(capsys, str(target), "--overwrite")
    assert target.read_bytes() == first
    assert main(["-q", "compress", "--model", str(model_dir), str(src), "-o", str(target), "--steps", "2",
                 "--overwrite"]) == 0
    assert target.read_bytes() != first
    # a model directory is never replaced silently either
    before = (model_dir / "model.safetensors").read_bytes()
    assert main(["new-model", "--preset", "tiny-pixel", "--seed", "5", "--out", str(model_dir)]) == 1
    one_error(capsys, str(model_dir), "--overwrite")
    assert (model_dir / "model.safetensors").read_bytes() == before


def test_an_output_that_is_a_directory_is_named(model_dir, tmp_path, capsys):
    src = save_png(tmp_path / "dir.png", rand_image(32, 32))
    (tmp_path / "out" / "dir.cod").mkdir(parents=True)
    assert main(["compress", "--model", str(model_dir), str(src), "-o", str(tmp_path / "out")]) == 1
    err = one_error(capsys, "out/dir.cod", "directory")
    assert ".partial" not in err


def test_a_full_disk_leaves_nothing_and_names_the_output(model_dir, tmp_path, capsys, monkeypatch):
    import cod.files

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cod.files.os, "fsync", full)
    src = save_png(tmp_path / "x.png", rand_image(32, 32))
    assert main(["compress", "--model", str(model_dir), str(src), "-o", str(tmp_path / "out"), "--steps", "1"]) == 1
    err = one_error(capsys, str(tmp_path / "out" / "x.cod"), "No space left on device")
    assert "None" not in err and ".partial" not in err
    assert no_outputs(tmp_path / "out")


@pytest.mark.parametrize("when", ["before the swap", "after the swap", "between two renames"])
def test_a_killed_save_leaves_a_complete_directory(model_dir, tmp_path, when):
    """SIGKILL while a model directory is written over an existing one (--overwrite): the directory is the old
    one or the new one, whole, never a mix (where the system cannot swap two directories in one step, the old
    one is renamed aside first; killed between the renames, it survives under a hidden name)."""
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    before = (target / "model.safetensors").read_bytes()
    kill = "os.kill(os.getpid(), signal.SIGKILL)"
    hook = {"before the swap": f"def exchange(a, b):\n    {kill}\n",
            "after the swap": f"def exchange(a, b):\n    real(a, b)\n    {kill}\n",
            "between two renames": ("calls = []\n"
                                    "def rename(a, b):\n    calls.append(a)\n    os.rename(a, b)\n"
                                    f"    if len(calls) == 1:\n        {kill}\n"
                                    "cod.files.os = type('os', (), {**vars(os), 'rename': staticmethod(rename)})\n"
                                    "def exchange(a, b):\n    return False\n")}[when]
    script = ("import os, signal, cod, cod.files\nreal = cod.files._exchange\n" + hook +
              "cod.files._exchange = exchange\n"
              f"cod.new_model('tiny-pixel', {str(target)!r}, seed=9, overwrite=True)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    if when == "between two renames":
        assert not target.exists()
        (old,) = tmp_path.glob(".model.old-*")
        assert (old / "model.safetensors").read_bytes() == before
        return
    assert ((target / "model.safetensors").read_bytes() == before) == (when == "before the swap")
    assert cod.load(target).fingerprint == json.loads((target / "config.json").read_text())["fingerprint"]


# ---- model directories: integrity -----------------------------------------------------------------------------
def test_wrong_or_damaged_weights_are_refused(model_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    shutil.copytree(model_dir, foreign)
    other = cod.new_model("tiny-pixel", seed=1)
    save_file({k: v.contiguous() for k, v in other.denoiser.state_dict().items()}, str(foreign / "model.safetensors"))
    flipped = tmp_path / "flipped"
    shutil.copytree(model_dir, flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-3] ^= 0x10
    (flipped / "model.safetensors").write_bytes(bytes(data))
    src = save_png(tmp_path / "x.png", rand_image(32, 32))
    for bad in (foreign, flipped):
        assert main(["compress", "--model", str(bad), str(src), "-o", str(tmp_path / "out")]) == 1
        one_error(capsys, str(bad / "model.safetensors"), "does not match")
        with pytest.raises(cod.model.ModelDirError):
            cod.load(bad)
    assert no_outputs(tmp_path / "out")


def test_verification_is_cached_by_file_identity(model_dir, tmp_path, monkeypatch):
    import cod.files

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    cod.load(copy)  # verified and remembered
    calls = []
    real = cod.files.sha256_file
    counting = lambda p: calls.append(p) or real(p)  # noqa: E731
    monkeypatch.setattr(cod.files, "sha256_file", counting)
    monkeypatch.setattr(cod.model, "sha256_file", counting)
    cod.load(copy)
    assert calls == []  # unchanged file: no re-hash
    cod.load(copy, verify="always")
    assert len(calls) == 1
    os.utime(copy / "model.safetensors")  # touched (mtime, ctime): hashed again
    cod.load(copy)
    assert len(calls) == 2


def _config_cases():
    def edit(fn):
        return fn

    return {
        "sde sampler": edit(lambda c: c["sampling"].update(sampler="euler_sde")),
        "cfg NaN": edit(lambda c: c["sampling"].update(cfg=float("nan"))),
        "timeshift 0": edit(lambda c: c["sampling"].update(timeshift=0)),
        "steps 10000": edit(lambda c: c["sampling"].update(steps=10000)),
        "missing sampling": edit(lambda c: c.pop("sampling")),
        "missing denoiser kwargs": edit(lambda c: c["denoiser"].pop("kwargs")),
        "huge hidden size": edit(lambda c: c["denoiser"]["kwargs"].update(hidden_size=1 << 20)),
        "num_groups 0": edit(lambda c: c["denoiser"]["kwargs"].update(num_groups=0)),
        "string ds": edit(lambda c: c["denoiser"]["kwargs"].update(ds="32")),
        "unknown class": edit(lambda c: c["denoiser"].update({"class": "os.system"})),
        "format version 99": edit(lambda c: c.update(format_version=99)),
        "fingerprint missing": edit(lambda c: c.pop("fingerprint")),
    }


@pytest.mark.parametrize("case", list(_config_cases()))
def test_malformed_configs_are_refused_in_one_line(model_dir, tmp_path, capsys, case):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    _config_cases()[case](config)
    (bad / "config.json").write_text(json.dumps(config))
    src = save_png(tmp_path / "x.png", rand_image(32, 32))
    assert main(["compress", "--model", str(bad), str(src), "-o", str(tmp_path / "out")]) == 1
    one_error(capsys, str(bad / "config.json"))
    assert no_outputs(tmp_path / "out")


@pytest.mark.parametrize("content", [b"", b"{" * 100000, b"\xff\xfe garbage", b"[1, 2]", b'{"format": "cod-model"'])
def test_unparsable_configs_are_refused_in_one_line(model_dir, tmp_path, capsys, content):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "config.json").write_bytes(content)
    assert main(["info", str(bad)]) == 1
    one_error(capsys, str(bad / "config.json"))


@pytest.mark.parametrize("case", ["truncated", "garbage header", "wrong shapes", "integer tensor", "empty"])
def test_malformed_weight_files_are_refused_in_one_line(model_dir, tmp_path, capsys, case):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    weights = bad / "model.safetensors"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "garbage header":
        weights.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    elif case == "wrong shapes":
        state = load_file(str(weights))
        key = next(iter(state))
        state[key] = state[key].flatten()[:1].clone()
        save_file(state, str(weights))
    elif case == "integer tensor":
        state = load_file(str(weights))
        key = next(iter(state))
        state[key] = state[key].to(dtype=__import__("torch").int32)
        save_file(state, str(weights))
    else:
        weights.write_bytes(b"")
    assert main(["info", str(bad)]) == 0  # the config itself is fine
    capsys.readouterr()
    src = save_png(tmp_path / "x.png", rand_image(32, 32))
    assert main(["compress", "--model", str(bad), str(src), "-o", str(tmp_path / "out")]) == 1
    one_error(capsys, str(weights))


@pytest.mark.parametrize("vae_file", ["../outside.safetensors", "/etc/passwd", "sub/vae.safetensors", "pipe",
                                      "missing.safetensors"])
def test_vae_file_must_be_a_regular_file_inside_the_directory(tmp_path, capsys, vae_file):
    src_dir = tmp_path / "lat"
    cod.new_model("tiny-latent", src_dir)
    config = json.loads((src_dir / "config.json").read_text())
    if vae_file == "pipe":
        os.mkfifo(src_dir / "pipe")
    config["latent"]["vae_file"] = vae_file
    (src_dir / "config.json").write_text(json.dumps(config))
    img = save_png(tmp_path / "x.png", rand_image(32, 32))
    assert main(["-q", "compress", "--model", str(src_dir), str(img), "-o", str(tmp_path / "x.cod")]) == 1
    one_error(capsys, str(src_dir))


# ---- the rest of the command line ------------------------------------------------------------------------------
def test_bogus_device_and_usage_errors_are_one_line(model_dir, tmp_path, capsys):
    src = save_png(tmp_path / "x.png", rand_image(32, 32))
    assert main(["compress", "--model", str(model_dir), str(src), "-o", str(tmp_path / "o"), "--device", "bogus"]) == 1
    one_error(capsys, "--device bogus")
    with pytest.raises(SystemExit) as e:
        main(["compress", "--model", str(model_dir), str(src)])
    assert e.value.code == 2
    one_error(capsys, "-o")
    assert main(["fit"]) == 2
    one_error(capsys, "--config")


def test_version_and_help_list_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"cod {cod.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "compress", "decompress", "evaluate", "demo", "export", "new-model", "import-official"):
        assert command in out


def test_onnx_export_without_onnx_says_what_to_install(model_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("onnx") else
                        real(name, *a))
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "x"), "--format", "onnx"]) == 1
    one_error(capsys, "pip install", "onnx")
    assert not (tmp_path / "x").exists()


def test_evaluate_goes_on_past_a_bad_image(model_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    save_png(folder / "good.png", rand_image(40, 40))
    (folder / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(model_dir), str(folder), "--out-dir", str(out), "--anchors", "jpeg",
                 "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 inputs failed" in err and "bad.png" in err and "evaluate: 2/2" in err
    rows = json.loads((out / "per_image.json").read_text())
    assert {r["image"] for r in rows} == {str(folder / "good.png")}
    assert main(["evaluate", "--model", str(model_dir), str(folder / "good.png"), "--out-dir", str(out)]) == 1
    one_error(capsys, "--overwrite")


def test_yaml_alias_bombs_are_refused(tmp_path, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (tmp_path / "bomb.yaml").write_text(bomb + "model: {preset: tiny-pixel}\n")
    assert len(bomb) < 1000
    assert main(["fit", "--config", str(tmp_path / "bomb.yaml")]) == 1
    one_error(capsys, "bomb.yaml", "aliases")
    assert main(["import-official", "--ckpt", str(tmp_path / "x.pt"), "--config", str(tmp_path / "bomb.yaml"),
                 "--out", str(tmp_path / "m")]) == 1
    one_error(capsys)


def test_odd_option_values_are_one_line(model, model_dir, tmp_path, capsys):
    data = model.compress([rand_image(32, 32)], steps=1)[0]
    (tmp_path / "x.cod").write_bytes(data)
    for extra, word in ((["--cfg", "inf"], "guidance"), (["--cfg", "1e300"], "guidance")):
        assert main(["decompress", "--model", str(model_dir), str(tmp_path / "x.cod"), "-o",
                     str(tmp_path / "o.png")] + extra) == 1
        one_error(capsys, word)
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "e"), "--format", "torchscript",
                 "--batch", "100000"]) == 1
    one_error(capsys, "megapixels")
    assert main(["info", str(tmp_path / "x.cod")]) == 1
    one_error(capsys, "is not a directory")


def test_no_home_directory_only_disables_the_cache(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("COD_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert cod.load(model_dir).fingerprint


# ---- found by an adversarial review (docs/robustness.md) -------------------------------------------------------
def test_codebook_search_in_runs_equals_one_search(monkeypatch):
    import torch

    import cod.models.vq as vq

    q = vq.VectorQuantizer(1 << 12, 16)
    z = torch.randn(2, 16, 9, 7)
    whole = q.nearest(z)
    monkeypatch.setattr(vq, "DISTANCE_BUDGET_BYTES", 4 * (1 << 12) * 5)  # runs of 5 rows
    assert torch.equal(q.nearest(z), whole)


def test_a_compressed_checkpoint_is_refused_before_loading(tmp_path, capsys):
    import zipfile

    import torch

    plain = tmp_path / "plain.pt"
    torch.save({"ema_denoiser.w": torch.zeros(4)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert main(["import-official", "--ckpt", str(bomb), "--preset", "tiny-pixel", "--out", str(tmp_path / "m")]) == 1
    one_error(capsys, str(bomb), "compressed")
    torch.save({"ema_denoiser.w": "not a tensor", 1: torch.zeros(1)}, tmp_path / "odd.pt")
    assert main(["import-official", "--ckpt", str(tmp_path / "odd.pt"), "--preset", "tiny-pixel",
                 "--out", str(tmp_path / "m")]) == 1
    one_error(capsys, "not a floating-point tensor")
    assert not (tmp_path / "m").exists()


def test_import_official_validates_the_release_config_before_building(tmp_path, capsys):
    import torch

    torch.save({"ema_denoiser.w": torch.zeros(4)}, tmp_path / "x.pt")
    for init_args in ("{num_groups: 0}", "{hidden_size: abc}", "5", "{hidden_size: 65536, num_blocks: 64}"):
        (tmp_path / "c.yaml").write_text(f"model:\n  denoiser:\n    class_path: x.PixNerDiT\n    init_args: "
                                         f"{init_args}\n")
        assert main(["import-official", "--ckpt", str(tmp_path / "x.pt"), "--config", str(tmp_path / "c.yaml"),
                     "--out", str(tmp_path / "m")]) == 1, init_args
        one_error(capsys, "c.yaml")


@pytest.mark.parametrize("fmt", ["ICO", "ICNS", "EPS", "TGA"])
def test_image_formats_outside_the_list_are_refused(tmp_path, capsys, fmt, model_dir):
    path = tmp_path / "x.png"  # the suffix does not decide: the content does
    image = Image.fromarray(rand_image(32, 32))
    try:
        image.save(path, format=fmt)
    except (OSError, KeyError, ValueError):
        pytest.skip(f"Pillow cannot write {fmt} here")
    assert main(["compress", "--model", str(model_dir), str(path), "-o", str(tmp_path / "o")]) == 1
    one_error(capsys, str(path), "cannot read image")


def test_a_jpeg_of_thousands_of_scans_is_refused(tmp_path, capsys, model_dir):
    import io

    buf = io.BytesIO()
    Image.fromarray(rand_image(64, 64)).save(buf, format="JPEG", progressive=True)
    data = buf.getvalue()
    sos = data.index(b"\xff\xda")
    bomb = data[:sos] + data[sos:-2] * 300 + b"\xff\xd9"  # the scans repeated: every one decodes the image again
    (tmp_path / "bomb.jpg").write_bytes(bomb)
    assert main(["compress", "--model", str(model_dir), str(tmp_path / "bomb.jpg"), "-o", str(tmp_path / "o")]) == 1
    one_error(capsys, "bomb.jpg", "scans")


def test_training_images_that_would_resize_past_the_bound_are_skipped():
    import random

    from cod.training.data import crop_or_skip

    strip = np.zeros((1, 16384, 3), np.uint8)
    assert crop_or_skip(strip, 256, True, random.Random(0), "strip.png") is None
    assert crop_or_skip(np.zeros((300, 400, 3), np.uint8), 256, True, random.Random(0), "ok.png").shape == (3, 256, 256)


def test_extends_fan_out_is_bounded(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("model: {preset: tiny-pixel}\n")
    (tmp_path / "b.yaml").write_text("extends: [" + ", ".join(["c.yaml"] * 40) + "]\n")
    (tmp_path / "a.yaml").write_text("extends: [" + ", ".join(["b.yaml"] * 40) + "]\n")
    assert main(["fit", "--config", str(tmp_path / "a.yaml")]) == 1
    one_error(capsys, "more than 64 files")


def test_overwrite_replaces_only_cods_own_outputs(model_dir, tmp_path, capsys):
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "sub" / "thesis.txt").write_text("years of work")
    # a file named like cod's marker is not enough: the content and the folder's other files are looked at
    (precious / "config.json").write_text("{}")
    (precious / "manifest.json").write_text('{"format": "onnx", "graphs": {}}')
    (precious / "report.json").write_text('{"held_out": []}')
    for argv in (["new-model", "--preset", "tiny-pixel", "--out", str(precious), "--overwrite"],
                 ["export", "--model", str(model_dir), "--out", str(precious), "--overwrite", "--format",
                  "torchscript", "--height", "32", "--width", "32"],
                 ["demo", "--out", str(precious), "--overwrite"]):
        assert main(argv) == 1
        one_error(capsys, str(precious), "only its own outputs")
    assert (precious / "sub" / "thesis.txt").read_text() == "years of work"
    mine = tmp_path / "mine"
    for seed in ("1", "2"):  # an earlier model directory is replaced as a whole
        assert main(["-q", "new-model", "--preset", "tiny-pixel", "--seed", seed, "--out", str(mine),
                     "--overwrite"]) == 0


def test_a_fifo_in_the_cache_is_ignored(model_dir, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.mkfifo(cache / "sha256.json")
    env = {**os.environ, "COD_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", f"import cod; print(cod.load({str(model_dir)!r}).fingerprint)"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and len(out.stdout.strip()) == 64, out.stderr


def test_a_bundled_vae_without_its_checksum_is_refused(tmp_path, capsys):
    lat = tmp_path / "lat"
    cod.new_model("tiny-latent", lat)
    config = json.loads((lat / "config.json").read_text())
    config.pop("checksums")
    (lat / "config.json").write_text(json.dumps(config))
    assert main(["info", str(lat)]) == 1
    one_error(capsys, "no sha256 of the bundled VAE")


def test_batches_stay_within_the_pixel_limit():
    assert api.batch_limit(64, (2048, 2048), Limits()) == 4
    assert api.batch_limit(64, (4096, 4096), Limits()) == 1
    assert api.batch_limit(3, (64, 64), Limits()) == 3


# ---- found by a second adversarial review ------------------------------------------------------------------------
def test_expanded_tensors_in_a_checkpoint_are_refused(model_dir, tmp_path, capsys):
    import torch

    state = {f"ema_denoiser.{k}": v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    state["diffusion_trainer.head"] = torch.zeros(1).expand(10_000_000)  # 4 stored bytes, 40 MB once copied
    torch.save({"state_dict": state}, tmp_path / "expanded.pt")
    assert main(["import-official", "--ckpt", str(tmp_path / "expanded.pt"), "--preset", "tiny-pixel",
                 "--out", str(tmp_path / "m")]) == 1
    one_error(capsys, "diffusion_trainer.head", "not a plain tensor")


def test_a_disguised_compressed_checkpoint_is_refused(tmp_path, capsys):
    import zipfile

    import torch

    torch.save({"ema_denoiser.w": torch.zeros(1000)}, tmp_path / "plain.pt")
    bomb = tmp_path / "tail.pt"
    with zipfile.ZipFile(tmp_path / "plain.pt") as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    bomb.write_bytes(bomb.read_bytes() + b"PK\x05\x06")  # zipfile.is_zipfile now says no; torch still reads it
    assert main(["import-official", "--ckpt", str(bomb), "--preset", "tiny-pixel", "--out", str(tmp_path / "m")]) == 1
    one_error(capsys, "bomb")


def test_a_vae_config_describing_a_huge_network_costs_nothing(tmp_path, capsys):
    from cod.models.vae import load_vae

    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [2048] * 6,
                                                    "layers_per_block": 8, "latent_channels": 64}))
    save_file({"x": __import__("torch").zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="does not match"):  # built on the meta device, compared, refused
        load_vae(folder)


def test_tar_shards_with_oversized_headers_are_skipped(tmp_path):
    import gzip
    import io
    import tarfile

    from cod.training.data import TarShards

    with gzip.open(tmp_path / "longname.tar.gz", "wb") as g:
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size = tarfile.GNUTYPE_LONGNAME, 5_000_000
        g.write(info.tobuf(format=tarfile.GNU_FORMAT) + b"a" * 5_000_000)
    good = io.BytesIO()
    Image.fromarray(rand_image(80, 80)).save(good, "PNG")
    with tarfile.open(tmp_path / "ok.tar", "w") as t:
        info = tarfile.TarInfo("a.png")
        info.size = len(good.getvalue())
        t.addfile(info, io.BytesIO(good.getvalue()))
    with pytest.warns(UserWarning, match="long-name header"):
        assert list(TarShards(str(tmp_path / "longname.tar.gz"), 64)) == []
    assert len(list(TarShards(str(tmp_path / "ok.tar"), 64))) == 1


def test_jpeg_and_png_segment_floods_are_refused(tmp_path, capsys, model_dir):
    import io

    buf = io.BytesIO()
    Image.fromarray(rand_image(16, 16)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    (tmp_path / "app.jpg").write_bytes(jpeg[:2] + b"\xff\xe5\x00\x02" * 5000 + jpeg[2:])
    buf = io.BytesIO()
    Image.fromarray(rand_image(16, 16)).save(buf, format="PNG")
    png = buf.getvalue()
    chunk = b"\x00\x00\x00\x00prVt\x00\x00\x00\x00"  # an empty private chunk (CRC not checked for those)
    (tmp_path / "chunks.png").write_bytes(png[:33] + chunk * 5000 + png[33:])
    for name in ("app.jpg", "chunks.png"):
        assert main(["compress", "--model", str(model_dir), str(tmp_path / name), "-o", str(tmp_path / "o")]) == 1
        one_error(capsys, name, "encoders write")


def test_fit_never_replaces_a_saved_config_and_checks_ckpt_path(tmp_path, monkeypatch, capsys):
    import torch

    from conftest import ROOT, TRAIN256, require

    require(TRAIN256)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("my: precious\n")
    tiny = str(ROOT / "conf" / "tiny.yaml")
    assert main(["fit", "--config", tiny, "--trainer.logger", "false", "--trainer.max_steps", "1",
                 "--trainer.enable_progress_bar", "false"]) == 1
    one_error(capsys, "config.yaml", "exists", only_line=False)
    assert (tmp_path / "config.yaml").read_text() == "my: precious\n"
    torch.save({"a": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert main(["fit", "--config", tiny, "--ckpt_path", str(tmp_path / "foreign.pt")]) == 1
    one_error(capsys, "not a checkpoint written by `cod fit`")
    assert main(["fit", "--config", tiny, "--ckpt_path", str(tmp_path / "foreign.pt"), "--weights_only",
                 "false"]) == 1
    one_error(capsys, "unpickle")


def test_a_cache_others_can_write_is_not_trusted(model_dir, tmp_path, monkeypatch):
    import cod.files

    shared = tmp_path / "shared-cache"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    monkeypatch.setenv("COD_CACHE_DIR", str(shared))
    assert cod.files.private_cache_dir() is None
    cod.load(model_dir)
    assert not (shared / "sha256.json").exists()  # nothing remembered, nothing read


def test_saving_a_model_never_launders_a_tampered_vae(tmp_path, capsys):
    lat = tmp_path / "lat"
    cod.new_model("tiny-latent", lat)
    data = bytearray((lat / "vae.safetensors").read_bytes())
    data[-2] ^= 0x40
    (lat / "vae.safetensors").write_bytes(bytes(data))
    model = cod.load(lat)  # the VAE is not needed yet
    with pytest.raises(cod.model.ModelDirError, match="does not match"):
        model.save(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_symbolic_link_loops_and_debug_zero(tmp_path, capsys, monkeypatch):
    (tmp_path / "l1").symlink_to(tmp_path / "l2")
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    assert main(["new-model", "--preset", "tiny-pixel", "--out", str(tmp_path / "l1")]) == 1
    one_error(capsys, "loop")
    monkeypatch.setenv("COD_DEBUG", "0")
    assert main(["info", str(tmp_path / "missing")]) == 1
    one_error(capsys, "does not exist")


def test_an_anchor_that_cannot_encode_an_image_is_a_warning(model_dir, tmp_path, capsys):
    save_png(tmp_path / "wide.png", rand_image(8, 20000))
    assert main(["evaluate", "--model", str(model_dir), str(tmp_path / "wide.png"), "--anchors", "webp",
                 "--steps", "1", "--out-dir", str(tmp_path / "ev")]) == 0
    assert "no WEBP anchor" in capsys.readouterr().err
    assert json.loads((tmp_path / "ev" / "per_image.json").read_text())[0]["method"] == "cod"
