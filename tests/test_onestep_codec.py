"""One-step models (tiny-cod-lite, tiny-onestep-cod) through cod.load, the codec API and the CLI: a file decodes to
exactly what the direct model call gives, both official header orders round-trip, the sampling options of
multi-step models are refused, and a model directory whose config and weights disagree is refused in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cod
from cod.cli import main
from cod.codec import api
from cod.errors import LimitError
from cod.limits import Limits, decode_tflop
from cod.model import OneStepModel, new_model
from cod.models.onestep import model_to_uint8
from cod.models.onestep_presets import get_onestep_preset

PRESETS = ("tiny-cod-lite", "tiny-onestep-cod")


@pytest.fixture(scope="module", params=PRESETS)
def model_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / request.param
    new_model(request.param, out, seed=1)
    return out


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def test_load_gives_a_folded_one_step_model(model_dir):
    model = cod.load(model_dir)
    assert isinstance(model, OneStepModel) and model.is_folded
    assert model.sampling_options == ("seed",)
    assert model.size_multiple == max(16, model.codec.ds)
    assert 0 < decode_tflop(model, 512, 512, 1) < 1


def test_file_decodes_to_the_direct_model_call(model_dir):
    """Any size (padded to multiples of max(16, ds), cropped back); the decode is one pass of the folded network."""
    model = cod.load(model_dir)
    img = image(40, 72)
    data = model.compress([img])[0]
    decoded = model.decompress(data)
    assert decoded.shape == img.shape
    padded = api._padded_batch([img], model)
    with torch.no_grad():
        indices = model.encode(padded)
        direct = model_to_uint8(model.denoiser.decode_indices(indices))[0, :, :40, :72].permute(1, 2, 0).numpy()
    assert np.array_equal(decoded, direct)
    _, parsed = api.parse(model, data)
    assert np.array_equal(parsed, indices[0].numpy())  # the file holds the encoder's indices


def test_official_format_round_trips_in_each_members_header_order(model_dir):
    model = cod.load(model_dir)
    m = model.size_multiple
    img = image(m, 2 * m, seed=3)  # not square: the header order matters
    data = model.compress([img], fmt="official")[0]
    first, second = int.from_bytes(data[:2], "little"), int.from_bytes(data[2:4], "little")
    assert (first, second) == ((2 * m, m) if model.family == "cod-lite" else (m, 2 * m))
    assert np.array_equal(model.decompress(data, fmt="official"), model.decompress(model.compress([img])[0]))


def test_cli_compress_decompress_evaluate(model_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(image(48, 64)).save(src / "a.png")
    assert main(["-q", "compress", str(src), "--model", str(model_dir), "-o", str(tmp_path / "c")]) == 0
    assert main(["-q", "decompress", str(tmp_path / "c"), "--model", str(model_dir), "-o", str(tmp_path / "d")]) == 0
    model = cod.load(model_dir)
    expected = model.decompress((tmp_path / "c" / "a.cod").read_bytes())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d" / "a.png")), expected)
    assert main(["-q", "evaluate", str(src), "--model", str(model_dir), "--anchors", "none",
                 "--out-dir", str(tmp_path / "e")]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["cod"]["images"] == 1


@pytest.mark.parametrize("option", [["--steps", "4"], ["--cfg", "3"], ["--sampler", "adam2"]])
def test_sampling_options_are_refused_in_one_line(model_dir, tmp_path, capsys, option):
    Image.fromarray(image(32, 32)).save(tmp_path / "a.png")
    assert main(["compress", str(tmp_path / "a.png"), "--model", str(model_dir), "-o", str(tmp_path / "a.cod"),
                 *option]) == 1
    err = capsys.readouterr().err
    assert "decodes in one network pass" in err and err.count("\n") == 1
    assert not (tmp_path / "a.cod").exists()


def test_a_window_size_is_refused_and_auto_tiling_leaves_the_one_pass_whole(model_dir, tmp_path, capsys):
    Image.fromarray(image(32, 32)).save(tmp_path / "a.png")
    assert main(["compress", str(tmp_path / "a.png"), "--model", str(model_dir), "-o", str(tmp_path / "a.cod")]) == 0
    assert main(["decompress", str(tmp_path / "a.cod"), "--model", str(model_dir), "--tile", "16", "-o",
                 str(tmp_path / "a2.png")]) == 1
    err = capsys.readouterr().err
    assert "--tile does not apply" in err and err.count("\n") == 1 and not (tmp_path / "a2.png").exists()
    model = cod.load(model_dir)
    assert model.network(4096, 4096) is model.denoiser  # above the automatic tiling size: still one whole pass


def test_bf16_decodes_the_same_files(model_dir):
    fp32, bf16 = cod.load(model_dir), cod.load(model_dir, precision="bf16")
    img = image(64, 64, seed=5)
    data = fp32.compress([img])[0]
    assert bf16.compress([img])[0] == data  # the encoder stays float32: the file does not depend on it
    diff = np.abs(bf16.decompress(data).astype(int) - fp32.decompress(data).astype(int))
    assert diff.mean() < 4  # bf16 rounding of the generator, not a different image


def test_limits_refuse_before_decoding(model_dir):
    model = cod.load(model_dir)
    data = model.compress([image(32, 32)])[0]
    with pytest.raises(LimitError, match="TFLOP"):
        model.decompress(data, limits=Limits(max_tflop=1e-9))


def test_seed_draws_the_noise_of_a_stochastic_model(tmp_path):
    spec = get_onestep_preset("tiny-cod-lite")
    spec.kwargs["noise_level"] = 1.0
    from cod.model import build_config

    config = build_config(spec, None)
    model = OneStepModel(config, spec.build().eval())
    model.save(tmp_path / "noisy")
    model = cod.load(tmp_path / "noisy")
    img = image(32, 32)
    default, seeded = model.compress([img])[0], model.compress([img], seed=7)[0]
    assert len(seeded) > len(default)  # the seed is stored in the file
    assert np.array_equal(model.decompress(seeded), model.decompress(seeded))
    assert not np.array_equal(model.decompress(seeded), model.decompress(default))


def _edit_config(model_dir, tmp_path, edit) -> str:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(family="pixel"), "denoiser.class"),
    (lambda c: c["denoiser"].update({"class": "PixNerDiT"}), "denoiser.class"),
    (lambda c: c["denoiser"]["kwargs"].update(hidden_size=96), "does not match"),
    (lambda c: c["denoiser"]["kwargs"].update(codebook_bits=8), "does not match"),
    (lambda c: c["sampling"].update(steps=25), "sampling.steps"),
    (lambda c: c["denoiser"]["kwargs"].update(pred="eps"), "denoiser.kwargs.pred"),
])
def test_config_that_does_not_describe_the_weights_is_refused(model_dir, tmp_path, capsys, edit, message):
    bad = _edit_config(model_dir, tmp_path, edit)
    Image.fromarray(image(32, 32)).save(tmp_path / "a.png")
    assert main(["compress", str(tmp_path / "a.png"), "--model", bad, "-o", str(tmp_path / "a.cod")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cod: error:") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_compiled_onestep_decode_is_frozen_for_its_own_calls_only():
    """OneStepModel.compile_denoiser compiles with inductor's freezing (weights as constants: what made CoD-Lite's
    CPU decode 0.51 -> 0.45 s, docs/benchmarks.md); freezing is a global inductor setting, so the decode sets it for
    its own calls and leaves it as it was. The compiled decode stays within float rounding of the eager one."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    model = cod.new_model("tiny-cod-lite").eval()
    model.fold_modulation()
    indices = model.encode(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    eager = model.decode(indices, 64, 64)
    seen = []
    inner = model.denoiser.decode_indices
    model.denoiser.decode_indices = lambda *a, **k: seen.append(inductor_config.freezing) or inner(*a, **k)
    model.compile_denoiser()
    compiled = model.decode(indices, 64, 64)
    assert seen == [True] and inductor_config.freezing is False
    assert (compiled.int() - eager.int()).abs().max() <= 1
