"""`cod export`: a model directory -> TorchScript or ONNX graphs for deployment without cod.

Three graphs, each traced at one image size (the shapes are baked in; export once per size you serve):
  encoder   image [B,3,H,W] in [0,1] (bf16-rounded by the caller, as CoDModel.condition_image does) -> indices
  decoder   indices [B,h,w] int64 -> condition map [B,D,H/16,W/16]
  step      (x [2B,C,h,w], t [2B], cond [2B,D,H/16,W/16]) -> velocity; the sampler loop (Adams/Euler with
            guidance, see cod/diffusion/samplers.py) stays in the host program
Every graph is checked against eager PyTorch right after export; manifest.json records shapes, the sampling
defaults and the measured errors.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch

from cod.errors import CodError, LimitError
from cod.files import atomic_directory, atomic_write_bytes, read_bytes_bounded
from cod.model import CoDModel

FORMATS = ("torchscript", "onnx")
MAX_INDEX_MISMATCH = 1e-3
MAX_EXPORT_PIXELS = 2048 * 2048  # graphs are traced at one size; tracing and checking at 4096^2 takes ~10 GB


def check_exportable(fmt: str) -> None:
    """Refuse a format whose packages are missing, before anything is written."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got '{fmt}'")
    if fmt == "onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise CodError(f"--format onnx needs the package(s) {', '.join(missing)}, which are not installed: "
                           f"pip install 'cod[onnx]' (or use --format torchscript)")


class _Encoder(torch.nn.Module):
    def __init__(self, codec):
        super().__init__()
        self.codec = codec

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.codec.bottleneck.nearest(self.codec.encoder(images01))


class _Decoder(torch.nn.Module):
    def __init__(self, codec):
        super().__init__()
        self.codec = codec

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codec.decode_indices(indices)


class _Step(torch.nn.Module):
    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x, t, cond=cond)[0]


def _example_inputs(model: CoDModel, height: int, width: int, batch: int) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, height, width, generator=g)
    with torch.no_grad():
        indices = model.codec.encode_indices(model.condition_image(images))
        cond = model.codec.decode_indices(indices)
    x = torch.randn(2 * batch, *model.model_shape(height, width), generator=g)
    return {"encoder": (images,), "decoder": (indices,),
            "step": (x, torch.full((2 * batch,), 0.5), torch.cat([cond, cond]))}


def is_export_dir(path: Path) -> bool:
    """An earlier export (what --overwrite may replace): cod's manifest.json and the graph files it lists."""
    try:
        manifest = json.loads(read_bytes_bounded(path / "manifest.json", 1 << 20, "manifest"))
        files = {g["file"] for g in manifest["graphs"].values()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return False
    return manifest.get("format") in FORMATS and {p.name for p in path.iterdir()} <= files | {"manifest.json"}


def export(model: CoDModel, out_dir: str | Path, fmt: str = "onnx", height: int = 512, width: int = 512,
           batch: int = 1, overwrite: bool = False) -> dict:
    """Write the graphs and manifest.json into out_dir, as a whole (assembled beside it, renamed into place)."""
    check_exportable(fmt)
    if model.family not in ("pixel", "latent"):
        raise ValueError(f"export writes the graphs of a multi-step CoD (encoder, decoder, one sampling step); this "
                         f"is a {model.family} model, which export does not support yet")
    if batch * height * width > MAX_EXPORT_PIXELS:
        raise LimitError(f"export size {batch}x{height}x{width} is {batch * height * width / 1e6:.1f} megapixels, "
                         f"over the {MAX_EXPORT_PIXELS / 1e6:.1f} an export traces and checks; graphs are traced at "
                         f"one size, so export at the size you serve, up to 2048x2048")
    model.check_size(height, width)
    with atomic_directory(Path(out_dir), overwrite, own=is_export_dir) as out:
        return _export(model.to("cpu").eval(), out, fmt, height, width, batch)


def _export(model: CoDModel, out: Path, fmt: str, height: int, width: int, batch: int) -> dict:
    graphs = {"encoder": _Encoder(model.codec), "decoder": _Decoder(model.codec), "step": _Step(model.denoiser)}
    inputs = _example_inputs(model, height, width, batch)
    names = {"encoder": (["images"], ["indices"]), "decoder": (["indices"], ["cond"]),
             "step": (["x", "t", "cond"], ["velocity"])}
    manifest = {"format": fmt, "height": height, "width": width, "batch": batch, "family": model.family,
                "fingerprint": model.fingerprint, "sampling": model.config["sampling"], "graphs": {}}
    for name, module in graphs.items():
        args = inputs[name]
        with torch.no_grad():
            expected = module(*args)
        suffix = ".pt" if fmt == "torchscript" else ".onnx"
        path = out / f"{name}{suffix}"
        # graphs are serialised in memory and written like every other output: a full disk is then an OSError
        # naming the file (torch's own file writers abort the process on one)
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if fmt == "torchscript":
                torch.jit.save(torch.jit.trace(module, args, check_trace=False), buf)
                actual = torch.jit.load(io.BytesIO(buf.getvalue()))(*args)
            else:
                torch.onnx.export(module, args, buf, dynamo=False, input_names=names[name][0],
                                  output_names=names[name][1], opset_version=17)
                actual = _run_onnx(buf.getvalue(), names[name][0], args)
        atomic_write_bytes(path, buf.getvalue())
        err = (actual.float() - expected.float()).abs().max().item()
        graph = {"file": path.name, "inputs": {n: list(a.shape) for n, a in zip(names[name][0], args)},
                 "output_shape": list(expected.shape), "max_abs_err_vs_eager": err}
        if expected.dtype == torch.int64:
            # the codebook search: a near-tie between two codewords can go the other way in another runtime's
            # float arithmetic; a real export error changes many indices
            mismatch = (actual != expected).float().mean().item()
            graph["index_mismatch_fraction"] = mismatch
            if mismatch > MAX_INDEX_MISMATCH:
                raise CodError(f"the exported {name} graph gives other codebook indices than PyTorch for "
                               f"{mismatch:.2%} of positions; the export is not usable (please report it)")
        manifest["graphs"][name] = graph
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _run_onnx(model: bytes, input_names: list[str], args: tuple) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {n: a.numpy() for n, a in zip(input_names, args)})[0])
