"""Images <-> .cod bytes for one model: padding to the model's size multiple, the container, the official
format, and batching.

Images of equal padded size (and, when decoding, equal sampling options) can be coded together, batch_size at a
time. Encoding is per sample (convolutions, then a nearest-codebook search), so a batch gives the same bytes as
one image at a time (tests/test_codec_api.py, tests/test_codec_cli.py). Decoding a batch draws each image's noise
from its own seeded generator, but matrix products over a larger batch may sum in another order: a pixel can
then come out one level off from decoding the file alone (about 2 in 100 000 values, measured on CPU). Batch
size 1, the default, is what makes a file's pixels independent of the files decoded beside it.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cod.codec import container
from cod.codec.bitpack import packed_size
from cod.codec.coders import EntropyCoder, FixedLengthCoder, no_prior_message
from cod.codec.container import BitstreamError, DecodeParams, Header
from cod.compat.official_format import read_official, read_official_lite, write_official, write_official_lite
from cod.files import MiB
from cod.images import as_rgb8  # noqa: F401 - part of this module's API
from cod.limits import Limits, check_pixels
from cod.model_config import DETERMINISTIC_SAMPLERS

FORMATS = ("cod", "official")
# "auto": entropy-code the indices under the model's prior when the model has one and that makes the file smaller;
# "off": always the fixed-length payload.
ENTROPY_MODES = ("auto", "off")
# The SDE samplers draw fresh noise at every step from the global RNG, so a file decoded with them would not
# give the same pixels twice; the codec offers only the deterministic (ODE) samplers.
CODEC_SAMPLERS = DETERMINISTIC_SAMPLERS
# No .cod file is larger: a 64-megapixel image at 16 bits per 4x4 pixels is 8 MiB of payload.
MAX_FILE_BYTES = 64 * MiB


def is_cod_file(path) -> bool:
    """A file --overwrite may replace with a new .cod file: a regular file named .cod, no larger than any .cod
    file (official-format files carry no signature, so the name and size are what can be checked)."""
    import os
    import stat as stat_module

    try:
        st = os.stat(path)
    except OSError:
        return False
    return str(path).lower().endswith(".cod") and stat_module.S_ISREG(st.st_mode) and st.st_size <= MAX_FILE_BYTES


def fixed_coder(model) -> FixedLengthCoder:
    return FixedLengthCoder(model.codec.bits, model.codec.bottleneck.num_codes)


def entropy_coder(model) -> EntropyCoder | None:
    """The model's entropy coder, when its directory has a prior."""
    prior = getattr(model, "prior", None)
    return EntropyCoder(prior, model.prior_fingerprint) if prior is not None else None


def padded_size(model, height: int, width: int) -> tuple[int, int]:
    m = model.size_multiple
    return math.ceil(height / m) * m, math.ceil(width / m) * m


def payload_size(model, height: int, width: int) -> int:
    ph, pw = padded_size(model, height, width)
    return packed_size((ph // model.codec.stride) * (pw // model.codec.stride), model.codec.bits)


def batch_limit(batch_size: int, padded: tuple[int, int], limits: Limits) -> int:
    """How many images of a padded size may be coded together: batch_size, but never so many that the batch holds
    more pixels than one image may have (the limit that bounds memory)."""
    return max(1, min(batch_size, limits.max_pixels // (padded[0] * padded[1])))


def batches(keys: Sequence[Hashable], batch_size: int, padded=None, limits: Limits = Limits()) -> list[list[int]]:
    """Positions grouped by equal key (groups in order of first appearance), each group cut into chunks of at
    most batch_size (and at most limits.max_pixels pixels, when padded(key) gives the padded size)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    out = []
    for key, g in groups.items():
        n = batch_size if padded is None else batch_limit(batch_size, padded(key), limits)
        out += [g[i:i + n] for i in range(0, len(g), n)]
    return out


def _padded_batch(arrays: list[np.ndarray], model) -> torch.Tensor:
    """uint8 HxWx3 images of one padded size -> [B, 3, H', W'] in [0, 1], padded at the bottom and right by edge
    replication. Replication is the one padding defined for every size (reflection cannot pad a 1x1 image to
    32x32) and it adds no structure: a token that straddles the border sees the border's own colours continued,
    where mirroring would copy texture and zeros would add a false edge for the codec to spend its bits on."""
    ph, pw = padded_size(model, *arrays[0].shape[:2])
    out = []
    for arr in arrays:
        H, W = arr.shape[:2]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
        out.append(F.pad(x, (0, pw - W, 0, ph - H), mode="replicate") if (ph, pw) != (H, W) else x)
    return torch.cat(out)


def official_header(model):
    """(write, read) of the release's .cod header for this model: height first (CoD, One-step CoD) or width first
    (CoD-Lite); both read back correctly (cod.compat.official_format)."""
    if model.official_width_first:
        return write_official_lite, read_official_lite
    return write_official, read_official


def _check_sampler(name: str) -> None:
    if name not in CODEC_SAMPLERS:
        raise ValueError(f"sampler '{name}' cannot be used for .cod files (choose one of {list(CODEC_SAMPLERS)}: "
                         f"the SDE samplers are not reproducible)")


def stored_params(model, fmt: str = "cod", sampler: str | None = None, steps: int | None = None,
                  cfg: float | None = None, seed: int | None = None) -> DecodeParams | None:
    """The decode parameters a file will carry: None when they all equal the model's defaults (seed 0). Raises
    ValueError for options a file cannot hold, before any coding work."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got '{fmt}'")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    model.check_decode_options({k: v for k, v in (("sampler", sampler), ("steps", steps), ("cfg", cfg))
                                if v is not None})
    d = model.config["sampling"]
    default = DecodeParams(d["sampler"], int(d["steps"]), float(d["cfg"]), 0)
    params = DecodeParams(sampler or default.sampler, default.steps if steps is None else int(steps),
                          default.cfg if cfg is None else float(cfg), 0 if seed is None else int(seed))
    _check_sampler(params.sampler)
    params.encode()  # refuses what a file cannot hold (steps > 256, seed outside 32 bits, ...)
    if params == default:
        return None
    if fmt == "official":
        raise ValueError("the official format cannot store sampling options: compress without them and give "
                         "them to decompress instead")
    return params


def check_compressible(model, height: int, width: int, fmt: str = "cod", limits: Limits = Limits(),
                       name: str = "image") -> None:
    """Raise ValueError unless an image of this size can be written in `fmt` within the limits (checked before any
    coding work)."""
    limits.check_encode(model, height, width, name)
    container.check_size(height, width)
    if fmt == "official" and (height, width) != padded_size(model, height, width):
        raise ValueError(f"the official format cannot restore a {height}x{width} image: its sides must be "
                         f"multiples of {model.size_multiple} (the default cod format takes any size)")
    if fmt == "official" and max(height, width) >= 1 << 16:
        raise ValueError(f"the official format's header cannot hold a {height}x{width} image (sides up to 65535)")


def compress(model, images, fmt: str = "cod", batch_size: int = 1, sampler: str | None = None,
             steps: int | None = None, cfg: float | None = None, seed: int | None = None,
             limits: Limits = Limits(), entropy: str = "auto") -> list[bytes]:
    """RGB images (HxWx3 uint8 arrays, PIL images, [3,H,W] tensors or a [B,3,H,W] float batch), any size ->
    one file's bytes each. Sampling options are stored in the file when they differ from the model's defaults.
    Images over limits.max_pixels are refused before any coding work. entropy="auto" codes the indices under the
    model's prior when it has one and the payload comes out smaller (never in the official format)."""
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"entropy must be one of {ENTROPY_MODES}, got '{entropy}'")
    params = stored_params(model, fmt, sampler, steps, cfg, seed)
    fixed = fixed_coder(model)
    coder = entropy_coder(model) if entropy == "auto" and fmt == "cod" else None
    arrays = [as_rgb8(image) for image in images]
    for i, arr in enumerate(arrays):
        check_compressible(model, *arr.shape[:2], fmt, limits, name=f"image {i}")
    out: list[bytes] = [b""] * len(arrays)
    for group in batches([padded_size(model, *a.shape[:2]) for a in arrays], batch_size, lambda k: k, limits):
        indices = model.encode(_padded_batch([arrays[i] for i in group], model)).cpu().numpy()
        for i, idx in zip(group, indices):
            H, W = arrays[i].shape[:2]
            payload = fixed.encode(idx)
            if fmt == "official":
                out[i] = official_header(model)[0](payload, H, W)
                continue
            header, key = Header(H, W, container.model_tag(model.fingerprint), params=params), b""
            if coder is not None:
                coded = coder.encode(idx)
                if len(coded) < len(payload):
                    payload, key = coded, coder.key
                    header = Header(H, W, header.model_tag, coder.mode, params, coder.payload_type)
            out[i] = container.write(header, payload, model.fingerprint, key)
    return out


def _typed_key(model):
    def key(header: Header, payload: bytes) -> bytes:
        if header.payload_type == container.TYPE_ENTROPY_INDICES:
            coder = entropy_coder(model)
            if coder is None:
                raise BitstreamError(no_prior_message(payload))
            coder.check_tag(payload)
            return coder.key
        raise BitstreamError(f"this file holds {container.PAYLOAD_TYPES[header.payload_type]}, not plain indices: "
                             f"decode it with `cod diffc decompress`")
    return key


def parse(model, data: bytes, fmt: str = "cod", limits: Limits = Limits()) -> tuple[Header, np.ndarray]:
    """File bytes -> (header, indices [h, w]) after every check; raises BitstreamError/LimitError. The declared
    size is checked against limits.max_pixels before anything of that size is allocated."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got '{fmt}'")
    if len(data) > MAX_FILE_BYTES:
        raise BitstreamError(f"{len(data)} bytes is larger than any .cod file ({MAX_FILE_BYTES} bytes)")
    if fmt == "official":
        H, W, payload = official_header(model)[1](data)
        if (H, W) != padded_size(model, H, W):
            raise BitstreamError(f"official file says {H}x{W}, which is not a multiple of this model's "
                                 f"{model.size_multiple}-pixel size multiple: wrong model or corrupted file")
        check_pixels(W, H, limits.max_pixels, "the file's image")
        need = payload_size(model, H, W)
        if len(payload) != need:
            raise BitstreamError(f"official file holds {len(payload)} payload bytes; a {H}x{W} image needs {need} "
                                 f"with this model (truncated, corrupted, or another model's file)")
        header = Header(H, W, container.model_tag(model.fingerprint))
    else:
        header, payload = container.read(data, model.fingerprint, lambda h, w: payload_size(model, h, w),
                                         _typed_key(model))
        check_pixels(header.width, header.height, limits.max_pixels, "the file's image")
    ph, pw = padded_size(model, header.height, header.width)
    h, w = ph // model.codec.stride, pw // model.codec.stride
    coder = entropy_coder(model) if header.payload_mode == container.PAYLOAD_TYPED else fixed_coder(model)
    return header, coder.decode(payload, h, w)


def decode_options(header: Header, sampler: str | None = None, steps: int | None = None, cfg: float | None = None,
                   seed: int | None = None) -> tuple[dict, int]:
    """Sampling options for a file: explicit overrides, else the file's stored parameters, else the model's
    defaults (left out of the dict) -> (options for model.decode, seed)."""
    p = header.params
    options = {"sampler": p.sampler, "steps": p.steps, "cfg": p.cfg} if p else {}
    options.update({k: v for k, v in (("sampler", sampler), ("steps", steps), ("cfg", cfg)) if v is not None})
    if "sampler" in options:
        _check_sampler(options["sampler"])
    if options.get("steps", 1) < 1:
        raise ValueError(f"steps must be at least 1, got {options['steps']}")
    if not math.isfinite(options.get("cfg", 0.0)) or abs(options.get("cfg", 0.0)) > container.FLOAT16_MAX:
        raise ValueError(f"guidance scale must be a finite number within +-{container.FLOAT16_MAX:g}, got "
                         f"{options['cfg']}")
    if seed is not None and not 0 <= seed < 1 << 32:
        raise ValueError(f"seed must be in [0, 2^32), got {seed}")
    return options, seed if seed is not None else (p.seed if p else 0)


def check_decodable(model, header: Header, options: dict, limits: Limits = Limits(), name: str = "file") -> None:
    """Refuse a parsed file whose decode is over the limits (pixels, steps, estimated work), before sampling."""
    model.check_decode_options(options)
    steps = options.get("steps", model.config["sampling"]["steps"])
    limits.check_decode(model, header.height, header.width, int(steps), name)


def decode_groups(model, items: list[tuple[Header, np.ndarray]], batch_size: int = 1, limits: Limits = Limits(),
                  **overrides) -> list[tuple[list[int], dict, list[int]]]:
    """Plan the decoding of parsed files: (positions in items, sampling options, seeds) per batch. Files of equal
    padded size and sampling options share a batch, batch_size at a time. Every option and limit is checked here,
    before anything is sampled."""
    resolved = [decode_options(header, **overrides) for header, _ in items]
    for (header, _), (options, _) in zip(items, resolved):
        check_decodable(model, header, options, limits)
    keys = [(padded_size(model, h.height, h.width), tuple(sorted(opts.items())))
            for (h, _), (opts, _) in zip(items, resolved)]
    return [(group, resolved[group[0]][0], [resolved[i][1] for i in group])
            for group in batches(keys, batch_size, lambda k: k[0], limits)]


def decode_group(model, items: list[tuple[Header, np.ndarray]], options: dict, seeds: list[int]) -> list[np.ndarray]:
    """Parsed files of one padded size and options -> HxWx3 uint8 images at their original sizes."""
    ph, pw = padded_size(model, items[0][0].height, items[0][0].width)
    idx = torch.from_numpy(np.stack([indices for _, indices in items]))
    images = model.decode(idx, ph, pw, seeds=seeds, **options).cpu()
    return [img[:, : h.height, : h.width].permute(1, 2, 0).numpy().copy() for (h, _), img in zip(items, images)]


def iter_decoded(model, items: list[tuple[Header, np.ndarray]], batch_size: int = 1, limits: Limits = Limits(),
                 **overrides) -> Iterator[tuple[int, np.ndarray]]:
    """Parsed files -> (position in items, HxWx3 uint8 image at its original size), batch by batch (see
    decode_groups). overrides: sampler, steps, cfg, seed (all checked before the first batch is sampled)."""
    for group, options, seeds in decode_groups(model, items, batch_size, limits, **overrides):
        yield from zip(group, decode_group(model, [items[i] for i in group], options, seeds))


def decompress(model, data: bytes, fmt: str = "cod", limits: Limits = Limits(), **overrides) -> np.ndarray:
    """File bytes -> HxWx3 uint8 image at the exact original size. overrides: sampler, steps, cfg, seed. A file
    whose decode is over the limits (pixels, steps, estimated work) is refused with a LimitError."""
    return next(iter_decoded(model, [parse(model, data, fmt, limits)], limits=limits, **overrides))[1]
