"""The precision seam (cod.precision): bf16 / int8 decodes close to the float32 decode within the bounds that
docs/precision.md documents, indices that never depend on the precision, fp8 and unknown precisions refused in
one line, and `--precision` end to end."""
from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import cod
from cod.cli import main
from cod.demo import embedded_model_dir
from cod.errors import CodError, PrecisionError
from cod.precision import KEEP_FP32, PRECISIONS, check_precision

SIZE = 64
# docs/precision.md: this test's decode measured bf16 max 6 levels / 49.2 dB, int8 max 7 / 46.7 dB.
BOUNDS = {"bf16": (12, 40.0), "int8": (16, 38.0)}


def photo_like(seed: int = 0) -> torch.Tensor:
    """A smooth image with some texture (what the demo model was trained on: photos)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    base = torch.stack([xx, yy, 1 - (xx + yy) / 2])
    return (0.8 * base + 0.2 * torch.rand(3, SIZE, SIZE, generator=g)).clamp(0, 1)[None]


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    d = a.float() - b.float()
    mse = d.pow(2).mean().item()
    return int(d.abs().max()), (math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse))


@pytest.fixture(scope="module")
def reference():
    model = cod.load(embedded_model_dir())
    image = photo_like()
    indices = model.encode(image)
    return image, indices, model.decode(indices, SIZE, SIZE)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_decodes_close_to_fp32_with_the_same_indices(reference, precision):
    image, indices, fp32 = reference
    model = cod.load(embedded_model_dir(), precision=precision)
    assert model.precision == precision
    assert torch.equal(model.encode(image), indices)  # the bitstream never depends on the precision
    out = model.decode(indices, SIZE, SIZE)
    assert out.dtype == torch.uint8 and out.shape == fp32.shape
    max_abs, psnr = compare(out, fp32)
    bound_max, bound_psnr = BOUNDS[precision]
    assert max_abs <= bound_max and psnr >= bound_psnr, (max_abs, psnr)
    assert not torch.equal(out, fp32)  # the decode side really ran in the reduced precision


def test_the_encoder_side_stays_float32_and_the_decode_side_is_converted():
    model = cod.load(embedded_model_dir(), precision="bf16")
    den = model.denoiser
    for part in (den.codec.encoder, den.codec.bottleneck, *(den.get_submodule(n) for n in KEEP_FP32)):
        assert {p.dtype for p in part.parameters()} == {torch.float32}
    assert {p.dtype for p in den.blocks.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in den.s_embedder.parameters()} == {torch.bfloat16}


def test_int8_quantises_the_transformer_linears_through_torchao():
    model = cod.load(embedded_model_dir(), precision="int8")
    qkv = model.denoiser.blocks[0].attn.qkv.weight
    assert "Int8" in type(qkv).__name__
    assert model.denoiser.x_embedder.embedder[0].weight.dtype == torch.bfloat16  # left out: see cod.precision
    assert model.denoiser.final_layer.linear.weight.dtype == torch.float32


def test_fp8_is_refused_on_cpu_in_one_line_and_unknown_precisions_list_the_choices():
    with pytest.raises(PrecisionError) as e:
        cod.load(embedded_model_dir(), precision="fp8")
    message = str(e.value)
    assert "\n" not in message and "fp8" in message and "CUDA" in message and "8.9" in message
    assert isinstance(e.value, CodError)
    with pytest.raises(PrecisionError, match="unknown precision 'fp16'.*fp32, bf16, int8, fp8"):
        cod.load(embedded_model_dir(), precision="fp16")
    with pytest.raises(PrecisionError):
        check_precision("fp8", "cpu")
    for precision in ("fp32", "bf16", "int8"):
        check_precision(precision, "cpu")
    assert PRECISIONS == ("fp32", "bf16", "int8", "fp8")


def test_a_converted_model_is_not_saved_and_not_converted_twice(tmp_path):
    model = cod.load(embedded_model_dir(), precision="bf16")
    with pytest.raises(CodError, match="decodes in bf16"):
        model.save(tmp_path / "m")
    assert model.set_precision("bf16") is model
    with pytest.raises(PrecisionError, match="load it again"):
        model.set_precision("int8")


def test_latent_models_decode_in_bf16_with_a_float32_vae(tmp_path):
    cod.new_model("tiny-latent", tmp_path / "lat")
    fp32, bf16 = cod.load(tmp_path / "lat"), cod.load(tmp_path / "lat", precision="bf16")
    image = photo_like()
    indices = fp32.encode(image)
    assert torch.equal(bf16.encode(image), indices)
    a, b = fp32.decode(indices, SIZE, SIZE, steps=2), bf16.decode(indices, SIZE, SIZE, steps=2)
    assert {p.dtype for p in bf16.latent.parameters()} == {torch.float32}  # once per image: kept (cod.precision)
    assert bf16.denoiser.blocks[0].mlp.w1.weight.dtype == torch.bfloat16
    assert compare(a, b)[1] > 30  # random weights: a loose bound (docs/precision.md has the measured figures)


def test_cli_precision_end_to_end(tmp_path, capsys):
    model = str(embedded_model_dir())
    src = tmp_path / "in.png"
    Image.fromarray((photo_like()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(src)
    assert main(["-q", "compress", str(src), "--model", model, "-o", str(tmp_path / "a.cod")]) == 0
    outs = {}
    for precision in ("fp32", "bf16", "int8"):
        out = tmp_path / f"{precision}.png"
        assert main(["-q", "decompress", str(tmp_path / "a.cod"), "--model", model, "--precision", precision,
                     "-o", str(out)]) == 0
        outs[precision] = torch.from_numpy(np.asarray(Image.open(out)).copy())
    for precision in ("bf16", "int8"):
        max_abs, psnr = compare(outs[precision], outs["fp32"])
        assert max_abs <= BOUNDS[precision][0] and psnr >= BOUNDS[precision][1]
    capsys.readouterr()
    assert main(["decompress", str(tmp_path / "a.cod"), "--model", model, "--precision", "fp8",
                 "-o", str(tmp_path / "fp8.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cod: error: precision fp8 needs a CUDA GPU")
    assert not (tmp_path / "fp8.png").exists()
    with pytest.raises(SystemExit) as e:
        main(["decompress", str(tmp_path / "a.cod"), "--model", model, "--precision", "fp16", "-o", "x.png"])
    assert e.value.code == 2
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_compile_wraps_the_denoiser_in_place_and_keeps_its_keys():
    """Compilation itself runs at the first decode (docs/benchmarks.md measures it), so this only checks the
    wiring: the whole forward by default, the repeated regions (the DiT blocks, the per-pixel stage) on request."""
    plain = cod.load(embedded_model_dir())
    model = cod.load(embedded_model_dir(), precision="bf16", compile=True)
    assert model.compiled and model.denoiser._compiled_call_impl is not None
    assert model.denoiser.blocks[0]._compiled_call_impl is None
    assert list(model.denoiser.state_dict()) == list(plain.denoiser.state_dict())
    assert model.compile_denoiser() is model
    regional = cod.load(embedded_model_dir()).compile_denoiser(regional=True)
    assert regional.denoiser._compiled_call_impl is None
    assert all(b._compiled_call_impl is not None for b in regional.denoiser.blocks[:regional.denoiser.num_cond_blocks])
    assert regional.denoiser.__dict__.get("_compiled_stage") is not None
    assert regional.denoiser.pixel_stage is regional.denoiser.__dict__["_compiled_stage"]
    assert list(regional.denoiser.state_dict()) == list(plain.denoiser.state_dict())
    copied = copy.deepcopy(regional.denoiser)  # a copy is uncompiled, as PyTorch copies a compiled module
    assert "_compiled_stage" not in copied.__dict__ and copied.blocks[0]._compiled_call_impl is None
    assert copied.pixel_stage.__self__ is copied
    pickle.dumps(regional.denoiser)


def test_regional_compile_shares_one_graph_across_blocks_and_decodes_as_eager(reference):
    """Every DiT block runs the same compiled code (their weights are the graph's inputs): compiling costs one
    block whatever the depth. The compiled decode equals the eager one up to float rounding."""
    from torch._dynamo.utils import counters

    _, indices, _ = reference
    model = cod.load(embedded_model_dir())
    torch._dynamo.reset()
    counters.clear()
    compiled = cod.load(embedded_model_dir()).compile_denoiser(regional=True)
    assert len(compiled.denoiser.blocks[:compiled.denoiser.num_cond_blocks]) > 1
    out = compiled.decode(indices, SIZE, SIZE, steps=2, cfg=1.0)
    ref = model.decode(indices, SIZE, SIZE, steps=2, cfg=1.0)
    # one graph for the blocks and one for the per-pixel stage (cfg 1: one batch size, one run of patches)
    assert counters["stats"]["unique_graphs"] == 2
    assert compare(out, ref)[0] <= 1


def test_cli_compile_flags_choose_whole_or_regional():
    from cod.cli import build_parser

    parse = build_parser().parse_args
    base = ["decompress", "a.cod", "--model", "m", "-o", "a.png"]
    assert parse(base).compile is False
    assert parse(["decompress", "--compile", *base[1:]]).compile == "whole"  # a flag: never takes the input's name
    assert parse([*base, "--compile-regions"]).compile == "regional"
    with pytest.raises(SystemExit):
        parse([*base, "--compile", "--compile-regions"])
    with pytest.raises(ValueError, match="compile must be"):
        cod.load(embedded_model_dir(), compile="fast")
