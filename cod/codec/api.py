"""Images <-> .cod bytes for one model: padding to the model's stride, the container, the official format.

Every image is encoded on its own, so a file's bytes never depend on which batch it was compressed in; decoding
also runs file by file by default, because CPU/GPU kernels round differently at other batch sizes and a file
must always decode to the same pixels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cod.codec import container
from cod.codec.bitpack import pack_indices, packed_size, unpack_indices
from cod.codec.container import BitstreamError, DecodeParams, Header
from cod.compat.official_format import read_official, write_official

FORMATS = ("cod", "official")


def _as_array(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        arr = image
    elif isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.dtype.is_floating_point:
            arr = (arr.clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr.permute(1, 2, 0).numpy() if arr.ndim == 3 and arr.shape[0] == 3 else arr.numpy()
    else:  # PIL image
        from cod.codec.images import to_rgb8

        arr = to_rgb8(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {arr.shape} and dtype {arr.dtype}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"empty image of shape {arr.shape}")
    return arr


def padded_size(model, height: int, width: int) -> tuple[int, int]:
    m = model.size_multiple
    return math.ceil(height / m) * m, math.ceil(width / m) * m


def payload_size(model, height: int, width: int) -> int:
    ph, pw = padded_size(model, height, width)
    return packed_size((ph // model.codec.stride) * (pw // model.codec.stride), model.codec.bits)


def _pad(arr: np.ndarray, model) -> torch.Tensor:
    """uint8 HxWx3 -> [1, 3, H', W'] in [0, 1], padded at the bottom/right by edge replication: the padding
    continues the border smoothly, so it costs the codec the least and leaks no mirrored structure inward."""
    H, W = arr.shape[:2]
    ph, pw = padded_size(model, H, W)
    x = torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div(255).unsqueeze(0)
    if (ph, pw) != (H, W):
        x = F.pad(x, (0, pw - W, 0, ph - H), mode="replicate")
    return x


def _decode_params(model, sampler=None, steps=None, cfg=None, seed=None) -> DecodeParams | None:
    """Stored only when they differ from the model's defaults (seed 0)."""
    d = model.config["sampling"]
    params = DecodeParams(sampler or d["sampler"], int(steps or d["steps"]), float(d["cfg"] if cfg is None else cfg),
                          int(seed or 0))
    default = DecodeParams(d["sampler"], int(d["steps"]), float(d["cfg"]), 0)
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return None if params == default else params


def compress(model, images, fmt: str = "cod", sampler: str | None = None, steps: int | None = None,
             cfg: float | None = None, seed: int | None = None) -> list[bytes]:
    """RGB images (HxWx3 uint8 arrays, PIL images or [3,H,W] tensors) -> one file's bytes each."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got '{fmt}'")
    params = _decode_params(model, sampler, steps, cfg, seed)
    if params is not None:
        params.encode()  # validate before any work
    out = []
    for image in images:
        arr = _as_array(image)
        H, W = arr.shape[:2]
        if fmt == "official":
            if (H, W) != padded_size(model, H, W):
                raise ValueError(f"the official format cannot restore a {H}x{W} image: its sides must be multiples "
                                 f"of {model.size_multiple} (use the default cod format for any size)")
            if params is not None:
                raise ValueError("the official format cannot store sampling options; decode with the same options")
        indices = model.encode(_pad(arr, model))
        payload = pack_indices(indices.flatten().cpu().numpy(), model.codec.bits)
        if fmt == "official":
            out.append(write_official(payload, H, W))
        else:
            out.append(container.write(Header(H, W, container.model_tag(model.fingerprint), params=params),
                                       payload, model.fingerprint))
    return out


def parse(model, data: bytes, fmt: str = "cod") -> tuple[Header, np.ndarray]:
    """File bytes -> (header, indices [h, w]) after every check; raises BitstreamError/ValueError."""
    if fmt == "official":
        H, W, payload = read_official(data)
        if (H, W) != padded_size(model, H, W):
            raise BitstreamError(f"official file says {H}x{W}, which is not a multiple of this model's "
                                 f"{model.size_multiple}-pixel stride: wrong model or corrupted file")
        need = payload_size(model, H, W)
        if len(payload) != need:
            raise BitstreamError(f"official file holds {len(payload)} payload bytes; a {H}x{W} image needs {need}")
        header = Header(H, W, container.model_tag(model.fingerprint))
    else:
        header, payload = container.read(data, model.fingerprint, lambda h, w: payload_size(model, h, w))
    ph, pw = padded_size(model, header.height, header.width)
    h, w = ph // model.codec.stride, pw // model.codec.stride
    indices = unpack_indices(payload, h * w, model.codec.bits).reshape(h, w)
    if indices.max(initial=0) >= model.codec.bottleneck.num_codes:
        raise BitstreamError("payload holds indices outside this model's codebook")
    return header, indices


def decompress(model, data: bytes, fmt: str = "cod", **overrides) -> np.ndarray:
    """File bytes -> HxWx3 uint8 image at the exact original size."""
    header, indices = parse(model, data, fmt)
    return decode_parsed(model, [(header, indices)], **overrides)[0]


def decode_parsed(model, items: list[tuple[Header, np.ndarray]], **overrides) -> list[np.ndarray]:
    """Decode parsed files that share a padded size and decode parameters in one batch."""
    header = items[0][0]
    p = header.params
    options = {"sampler": p.sampler, "steps": p.steps, "cfg": p.cfg} if p else {}
    options.update({k: v for k, v in overrides.items() if v is not None})
    seed = options.pop("seed", None)
    seed = seed if seed is not None else (p.seed if p else 0)
    ph, pw = padded_size(model, header.height, header.width)
    idx = torch.from_numpy(np.stack([i for _, i in items]))
    images = model.decode(idx, ph, pw, seeds=seed, **options)
    return [img[:, : h.height, : h.width].permute(1, 2, 0).cpu().numpy().copy()
            for img, (h, _) in zip(images, items)]
