"""DiffC with a CoD model: the encoder and decoder loops and the payload (spec §6.4-6.10, docs/diffc.md).

Both sides start from the same Philox noise at t = 0 and hold the same x_t at every step. At step k the
encoder, which knows the target x0, codes a sample of q(x_t' | x_t, x0) with about KL(q || p) bits; the decoder
regenerates it from the transmitted chunk indices. After K steps a deterministic probability-flow (Euler) denoise
runs to t = 1. The entropy-coded stream depends on no network output, so a file parses completely before any
network call, and the decoder, running the encoder's float operations in the encoder's order, reproduces its
final sample bit for bit on the same device and precision.

Payload (container mode 1, type 0x01):
    type 0x01 | flags (bit 7 C: VQ indices present; bit 6 P: release-parity times, not supported; rest 0) |
    schedule id | (M - 1) << 4 | P | K (LEB128, shortest) | [VQ indices as payload mode 0] | coded stream
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from cod.codec import container
from cod.codec.api import _padded_batch, padded_size
from cod.codec.bitpack import pack_indices, packed_size, unpack_indices
from cod.codec.container import BitstreamError, DecodeParams, Header
from cod.diffc import algebra, pfr, philox, schedule
from cod.diffc.layout import check_chunk_parameters, layout, max_valid_budget, partition
from cod.diffc.stream import StreamEncoder, decode_steps
from cod.diffusion.flow import sampling_grid
from cod.diffusion.samplers import adams_coefficients, apply_guidance
from cod.images import as_rgb8
from cod.limits import Limits, check_pixels, decode_tflop
from cod.model_config import ONESTEP_FAMILIES

FLAG_CONDITIONAL = 0x80
FLAG_PARITY = 0x40
DENOISE_SAMPLERS = ("euler", "adam1", "adam2", "adam3", "adam4")
StepCallback = Callable[[dict], None]


class DiffCWarning(UserWarning):
    """An encoder-side compromise that still gives a valid file (a budget clamped to a valid layout)."""


@dataclass(frozen=True)
class Fields:
    """The DiffC payload's fields (everything but the coded stream)."""

    conditional: bool = True
    schedule: int = 0
    max_bits: int = 16
    padding: int = 2
    steps: int = 0  # K

    def encode(self) -> bytes:
        check_chunk_parameters(self.max_bits, self.padding)
        if self.schedule not in schedule.SCHEDULES:
            raise ValueError(f"unknown DiffC schedule id {self.schedule}")
        if not 0 <= self.steps <= len(schedule.SCHEDULES[self.schedule][0]):
            raise ValueError(f"K = {self.steps} steps is outside this schedule")
        return bytes([container.TYPE_DIFFC, FLAG_CONDITIONAL if self.conditional else 0, self.schedule,
                      (self.max_bits - 1) << 4 | self.padding]) + container._varint(self.steps)


@dataclass
class Encoded:
    """What compress returns: the file and how it was made."""

    data: bytes
    fields: Fields
    budgets: list[int]                   # n_k per step
    kl_bits: list[float]                 # the measured KL of each step (before any clamp)
    code_bits: float                     # the stream's model code length
    chosen: list[list[int]] = field(default_factory=list)  # the chunk indices of each step
    vq: bytes = b""                      # the packed VQ indices (conditional prior)
    states: dict = field(default_factory=dict)  # K -> x after K steps, for the K asked for in compress(keep=)
    image: np.ndarray | None = None      # the decoder's output, when compress(reconstruct=True)
    sample: torch.Tensor | None = None   # the final model-space sample, when reconstructed
    seconds: dict = field(default_factory=dict)


# -------------------------------------------------------------------------------------------------------------
# geometry, targets, conditions, the network
# -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    height: int
    width: int
    padded: tuple[int, int]
    shape: tuple[int, int, int]  # model space [C, h, w]

    @property
    def dims(self) -> int:
        return math.prod(self.shape)

    def index_grid(self, model) -> tuple[int, int]:
        s = model.codec.stride
        return self.padded[0] // s, self.padded[1] // s


def geometry(model, height: int, width: int) -> Geometry:
    if model.family in ONESTEP_FAMILIES:  # cod.model.OneStepModel: no diffusion trajectory to code
        raise ValueError(f"DiffC needs a diffusion model (a pixel or latent CoD); this is a {model.family} model, "
                         f"which decodes in one pass: use `cod compress` / `cod decompress` with it")
    ph, pw = padded_size(model, height, width)
    return Geometry(height, width, (ph, pw), tuple(model.model_shape(ph, pw)))


def padding_mask(model, geo: Geometry) -> torch.Tensor | None:
    """bool [1, C, h, w]: model-space dimensions that lie entirely in the padding (their residual is set to 0:
    no bits are spent on pixels the decoder crops away), or None when nothing is padded."""
    if geo.padded == (geo.height, geo.width):
        return None
    C, h, w = geo.shape
    f = geo.padded[0] // h
    rows = torch.arange(h) * f >= geo.height
    cols = torch.arange(w) * f >= geo.width
    return (rows[:, None] | cols[None, :]).expand(1, C, h, w)


def target(model, image01: torch.Tensor) -> torch.Tensor:
    """x0 in model space: the pixels in [-1, 1], or the VAE posterior *mean* times the latent scale (the release
    draws a posterior sample, unseeded: a documented deviation)."""
    if model.family == "latent":
        model._ensure_latent()
        return model.latent.to_latent(image01, sample=False).float()
    return (image01 - 0.5) / 0.5


def _velocity(model, x: torch.Tensor, t: float, cond: torch.Tensor) -> torch.Tensor:
    t_in = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    out, _ = model.denoiser(x, t_in, y=None, cond=cond)
    return out.float()


def _guided_velocity(model, x: torch.Tensor, t: float, cond: torch.Tensor, uncond: torch.Tensor | None,
                     cfg: float) -> torch.Tensor:
    """The denoise's velocity: CFG with scale cfg at every t on the batch [uncond; cond], or the condition alone
    when there is no unconditional branch (the null-condition prior)."""
    if uncond is None:
        return _velocity(model, x, t, cond)
    return apply_guidance(_velocity(model, torch.cat([x, x]), t, torch.cat([uncond, cond])), cfg)


# -------------------------------------------------------------------------------------------------------------
# the denoise after step K
# -------------------------------------------------------------------------------------------------------------
def denoise_plan(model, fields: Fields, params: DecodeParams | None) -> tuple[str, list[float], float]:
    """(sampler, time grid from t_K to 1, guidance scale) of the final denoise."""
    if params is None:
        return "euler", schedule.denoise_times(fields.steps, fields.schedule), float(model.config["sampling"]["cfg"])
    if params.sampler not in DENOISE_SAMPLERS:
        raise BitstreamError(f"sampler '{params.sampler}' cannot run a DiffC denoise (use one of {DENOISE_SAMPLERS})")
    s = model.config["sampling"]
    t_k = schedule.to_time(schedule.last_noise_level(fields.steps, fields.schedule))
    g = sampling_grid(params.steps, s.get("last_step", 0.04), s.get("timeshift", 1.0)).double().tolist()
    return params.sampler, [t_k + (1 - t_k) * gi for gi in g[:-1]] + [1.0], float(params.cfg)


@torch.no_grad()
def denoise(model, x: torch.Tensor, grid: list[float], sampler: str, cfg: float, cond: torch.Tensor,
            uncond: torch.Tensor | None) -> torch.Tensor:
    """Probability-flow ODE from grid[0] to grid[-1] = 1: Euler, or Adams-Bashforth of order 1-4."""
    order = 1 if sampler == "euler" else int(sampler[-1])
    history: list[torch.Tensor] = []
    for i in range(len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        history = (history + [_guided_velocity(model, x, t, cond, uncond, cfg)])[-order:]
        q = len(history)
        weights = adams_coefficients(grid[i - q + 1: i + 1], t, t_next) if q > 1 else [1.0]
        update = history[-q] * weights[0]
        for w, v in zip(weights[1:], history[-q + 1:]):
            update = update + w * v
        x = x + (t_next - t) * update
    return x


# -------------------------------------------------------------------------------------------------------------
# limits
# -------------------------------------------------------------------------------------------------------------
def check_work(model, height: int, width: int, steps: int, denoise_steps: int, limits: Limits,
               name: str = "image") -> None:
    """Refuse a DiffC encode or decode over the pixel or work limit, before any work. The K DiffC steps are
    single network passes, the denoise steps guidance pairs; the work limit counts both (in pairs)."""
    check_pixels(width, height, limits.max_pixels, name)
    pairs = math.ceil(steps / 2) + denoise_steps
    work = decode_tflop(model, height, width, max(pairs, 1))
    budget = limits.tflop_budget(model.device)
    if work > budget:
        from cod.errors import LimitError

        raise LimitError(f"{name}: DiffC with {steps} steps and {denoise_steps} denoise steps on a {width}x{height} "
                         f"image is estimated at {work:,.0f} TFLOP, over the limit of {budget:,.0f} TFLOP for a "
                         f"{model.device.type} device (--max-tflop); pass --max-tflop {math.ceil(work)} to run it "
                         f"anyway, or use fewer steps")


# -------------------------------------------------------------------------------------------------------------
# encoder
# -------------------------------------------------------------------------------------------------------------
def _conditions(model, geo: Geometry, indices: torch.Tensor | None):
    """(the DiffC steps' condition map, the denoise's unconditional map or None)."""
    uncond = model.unconditional_condition(*geo.padded)
    if indices is None:
        return uncond, None
    return model.codec.decode_indices(indices.to(model.device)), uncond


def _to_device(z: np.ndarray, geo: Geometry, device) -> torch.Tensor:
    return torch.from_numpy(z).reshape(1, *geo.shape).to(device)


def fixed_bytes(model, geo: Geometry, fields: Fields, params: DecodeParams | None) -> int:
    """Bytes of a file besides its coded stream: header, check byte, decode parameters, DiffC fields, VQ."""
    header = Header(geo.height, geo.width, 0, container.PAYLOAD_TYPED, params)
    head = len(container._header_bits(header)) + 1 + (len(params.encode()) if params else 0)
    vq = packed_size(math.prod(geo.index_grid(model)), model.codec.bits) if fields.conditional else 0
    return head + len(fields.encode()) + vq


@torch.no_grad()
def compress(model, image, *, steps: int | None = None, recon_t: float | None = None, bpp: float | None = None,
             seed: int = 0, conditional: bool = True, padding: int = 2, max_bits: int = 16,
             params: DecodeParams | None = None, backend: str = "auto", reconstruct: bool = False,
             limits: Limits = Limits(), on_step: StepCallback | None = None, keep=()) -> Encoded:
    """An RGB image (HxWx3 uint8 array, PIL image, tensor) -> a DiffC .cod file.

    Rate: exactly one of steps (K), recon_t (the release's recon timestep: K = 1 + the first schedule index with
    T_k <= recon_t) or bpp (stop at the first step whose running file size reaches this many bits per pixel;
    the whole schedule if it never does). seed is the Philox key (stored in the file's decode parameters when not
    0). params: explicit denoise parameters to store (sampler, steps, cfg, seed). reconstruct: also run the
    decoder's denoise and return its image (what decompress will give, bit for bit on this device). keep: step
    counts K whose state x_K to return in Encoded.states (an RD sweep denoises each; see evaluate)."""
    if sum(v is not None for v in (steps, recon_t, bpp)) != 1:
        raise ValueError("give exactly one of steps, recon_t or bpp")
    check_chunk_parameters(max_bits, padding)
    encoding = schedule.SCHEDULES[0][0]
    if steps is not None and not 0 <= steps <= len(encoding):
        raise ValueError(f"DiffC steps must be in [0, {len(encoding)}], got {steps}")
    if bpp is not None and not (math.isfinite(bpp) and bpp > 0):
        raise ValueError(f"target bpp must be a positive number, got {bpp}")
    if not 0 <= seed < 1 << 32:
        raise ValueError(f"seed must be in [0, 2^32), got {seed}")
    if params is None and seed:
        s = model.config["sampling"]
        params = DecodeParams("euler", len(schedule.DENOISING_TIMESTEPS), float(s["cfg"]), seed)
    if params is not None:
        params.encode()
        if params.sampler not in DENOISE_SAMPLERS:
            raise ValueError(f"sampler '{params.sampler}' cannot run a DiffC denoise (use one of {DENOISE_SAMPLERS})")
        seed = params.seed
    K_max = steps if steps is not None else (schedule.steps_for_recon_t(recon_t) if recon_t is not None
                                             else len(encoding))
    arr = as_rgb8(image)
    H, W = arr.shape[:2]
    geo = geometry(model, H, W)
    container.check_size(H, W)
    limits.check_encode(model, H, W, "image")
    check_work(model, H, W, K_max, len(schedule.DENOISING_TIMESTEPS) if reconstruct else 0, limits)

    clock = {"start": time.perf_counter()}
    device = model.device
    image01 = _padded_batch([arr], model).to(device)
    x0 = target(model, image01)
    mask = padding_mask(model, geo)
    indices = model.encode(image01).cpu() if conditional else None
    cond, uncond = _conditions(model, geo, indices)
    fields = Fields(conditional, 0, max_bits, padding, 0)
    D = geo.dims
    backend = pfr.resolve_backend(backend, device)
    coder = StreamEncoder(D, max_bits, padding)
    base_bits = 8 * fixed_bytes(model, geo, fields, params)
    budgets, kls, chosen_steps, states = [], [], [], {}
    if 0 in keep:
        states[0] = None
    x = _to_device(philox.initial_noise(seed, D), geo, device)
    t = 0.0
    for k in range(K_max):
        t_next = schedule.to_time(encoding[k])
        co = algebra.coefficients(t, t_next)
        x0_hat = algebra.clean_estimate(x, _velocity(model, x, t, cond), t)
        r = algebra.residual(x0, x0_hat, co)
        if mask is not None:
            r = r.masked_fill(mask.to(r.device), 0.0)
        kl = algebra.kl_bits(r)
        n = max_valid_budget(math.ceil(kl), D, max_bits, padding)
        if n < math.ceil(kl):
            warnings.warn(f"step {k}: a KL of {kl:.0f} bits is more than {D} dimensions can carry in valid chunks; "
                          f"sent {n} bits (the sample leans towards the prior)", DiffCWarning, stacklevel=2)
        lay = layout(n, D, max_bits, padding)
        order = None
        chosen: list[int] = []
        if lay.chunks:
            order = partition(seed, k, lay, D)
            r_flat = r.reshape(-1)
            r_perm = (r_flat[torch.from_numpy(order).to(r_flat.device)] if backend == "triton"
                      else r_flat.cpu().numpy()[order])
            chosen = pfr.select(seed, k, lay, r_perm, backend, device)
        z = _to_device(pfr.step_sample(seed, k, lay, chosen, order, D), geo, device)
        x = algebra.update(x, x0_hat, z, co)
        coder.add_step(n, chosen)
        budgets.append(n)
        kls.append(kl)
        chosen_steps.append(chosen)
        if k + 1 in keep:
            states[k + 1] = x.clone()
        t = t_next
        total = base_bits + coder.bits
        if on_step is not None:
            on_step({"step": k + 1, "of": K_max, "t": t, "budget": n, "kl": kl, "bits": total,
                     "bpp": total / (H * W), "seconds": time.perf_counter() - clock["start"]})
        if bpp is not None and total >= bpp * H * W:
            break
    if 0 in states:
        states[0] = _to_device(philox.initial_noise(seed, D), geo, device)
    fields = Fields(conditional, 0, max_bits, padding, len(budgets))
    vq = pack_indices(indices[0].numpy(), model.codec.bits) if conditional else b""
    data = write_file(model, H, W, fields, params, vq, coder.to_bytes())
    clock["encode"] = time.perf_counter() - clock["start"]
    out = Encoded(data, fields, budgets, kls, coder.bits, chosen_steps, vq, states,
                  seconds={"encode": clock["encode"]})
    if reconstruct:
        sampler, grid, cfg = denoise_plan(model, fields, params)
        out.sample = denoise(model, x, grid, sampler, cfg, cond, uncond)
        out.image = _to_image(model, out.sample, geo)
        out.seconds["denoise"] = time.perf_counter() - clock["start"] - clock["encode"]
    return out


def write_file(model, height: int, width: int, fields: Fields, params: DecodeParams | None, vq: bytes,
               coded: bytes) -> bytes:
    header = Header(height, width, container.model_tag(model.fingerprint), container.PAYLOAD_TYPED, params)
    return container.write(header, fields.encode() + vq + coded, model.fingerprint)


def prefix_file(model, height: int, width: int, enc: Encoded, K: int, params: DecodeParams | None = None) -> bytes:
    """The file of the first K steps of an encode (DiffC is progressive: it decodes to the chain's state x_K)."""
    from cod.diffc.stream import encode_steps

    fields = Fields(enc.fields.conditional, enc.fields.schedule, enc.fields.max_bits, enc.fields.padding, K)
    geo = geometry(model, height, width)
    coded = encode_steps(list(zip(enc.budgets[:K], enc.chosen[:K])), geo.dims, fields.max_bits, fields.padding)
    return write_file(model, height, width, fields, params, enc.vq, coded)


def _to_image(model, x: torch.Tensor, geo: Geometry) -> np.ndarray:
    img = model.to_uint8(x)[0].cpu()
    return img[:, : geo.height, : geo.width].permute(1, 2, 0).numpy().copy()


# -------------------------------------------------------------------------------------------------------------
# decoder
# -------------------------------------------------------------------------------------------------------------
@dataclass
class Parsed:
    header: Header
    fields: Fields
    geometry: Geometry
    indices: np.ndarray | None  # VQ indices [h, w] when conditional
    steps: list                 # [(layout, chunk indices)] per DiffC step


def _read_varint(data: bytes, pos: int, max_bytes: int = 3) -> tuple[int, int]:
    value = 0
    for i in range(max_bytes):
        if pos + i >= len(data):
            raise BitstreamError("malformed DiffC payload: it ends inside K (truncated)")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and not byte:
                break
            return value, pos + i + 1
    raise BitstreamError("malformed DiffC payload: K is not a shortest LEB128 number")


def parse(model, data: bytes, limits: Limits = Limits()) -> Parsed:
    """A DiffC file -> its parsed fields and symbols, after every check (spec §6.9), before any network call."""
    from cod.codec.api import MAX_FILE_BYTES, payload_size

    if len(data) > MAX_FILE_BYTES:
        raise BitstreamError(f"{len(data)} bytes is larger than any .cod file ({MAX_FILE_BYTES} bytes)")
    header, payload = container.read(data, model.fingerprint, lambda h, w: payload_size(model, h, w))
    container.require_mode(header, container.TYPE_DIFFC)
    check_pixels(header.width, header.height, limits.max_pixels, "the file's image")
    if len(payload) < 5:
        raise BitstreamError("malformed DiffC payload: shorter than its fixed fields (truncated)")
    flags, sched, chunk = payload[1], payload[2], payload[3]
    if flags & 0x3F:
        raise BitstreamError(f"malformed DiffC payload: reserved flag bits set (0x{flags:02x})")
    if flags & FLAG_PARITY:
        raise BitstreamError("this DiffC file uses the release-parity time mapping, which this cod does not decode")
    if sched not in schedule.SCHEDULES:
        raise BitstreamError(f"this DiffC file uses schedule {sched}, which this cod does not know")
    max_bits, padding = (chunk >> 4) + 1, chunk & 0xF
    if not padding < max_bits <= 16:
        raise BitstreamError(f"malformed DiffC payload: chunk parameters M={max_bits}, P={padding}")
    K, pos = _read_varint(payload, 4)
    if K > len(schedule.SCHEDULES[sched][0]):
        raise BitstreamError(f"malformed DiffC payload: K = {K} is longer than its schedule")
    fields = Fields(bool(flags & FLAG_CONDITIONAL), sched, max_bits, padding, K)
    geo = geometry(model, header.height, header.width)
    indices = None
    if fields.conditional:
        h, w = geo.index_grid(model)
        size = packed_size(h * w, model.codec.bits)
        if len(payload) < pos + size:
            raise BitstreamError("malformed DiffC payload: it ends inside the VQ indices (truncated)")
        indices = unpack_indices(payload[pos:pos + size], h * w, model.codec.bits).reshape(h, w)
        if indices.max(initial=0) >= model.codec.bottleneck.num_codes:
            raise BitstreamError("payload holds indices outside this model's codebook")
        pos += size
    steps = decode_steps(payload[pos:], K, geo.dims, max_bits, padding)
    return Parsed(header, fields, geo, indices, steps)


@torch.no_grad()
def decode_sample(model, parsed: Parsed, on_step: StepCallback | None = None) -> torch.Tensor:
    """The final model-space sample of a parsed file (the encoder's, bit for bit on the same device)."""
    fields, geo, params = parsed.fields, parsed.geometry, parsed.header.params
    seed = params.seed if params else 0
    sampler, grid, cfg = denoise_plan(model, fields, params)
    device = model.device
    idx = torch.from_numpy(parsed.indices[None].astype(np.int64)) if parsed.indices is not None else None
    cond, uncond = _conditions(model, geo, idx)
    D = geo.dims
    encoding = schedule.SCHEDULES[fields.schedule][0]
    x = _to_device(philox.initial_noise(seed, D), geo, device)
    t = 0.0
    start = time.perf_counter()
    total = len(parsed.steps) + len(grid) - 1
    for k, (lay, chosen) in enumerate(parsed.steps):
        t_next = schedule.to_time(encoding[k])
        co = algebra.coefficients(t, t_next)
        x0_hat = algebra.clean_estimate(x, _velocity(model, x, t, cond), t)
        order = partition(seed, k, lay, D) if lay.chunks else None
        z = _to_device(pfr.step_sample(seed, k, lay, chosen, order, D), geo, device)
        x = algebra.update(x, x0_hat, z, co)
        t = t_next
        if on_step is not None:
            on_step({"step": k + 1, "of": total, "t": t, "seconds": time.perf_counter() - start})
    return denoise(model, x, grid, sampler, cfg, cond, uncond)


def decompress(model, data: bytes, limits: Limits = Limits(), on_step: StepCallback | None = None) -> np.ndarray:
    """DiffC .cod bytes -> HxWx3 uint8 image at the original size."""
    parsed = parse(model, data, limits)
    check_decodable(model, parsed, limits)
    model._ensure_latent()
    return _to_image(model, decode_sample(model, parsed, on_step), parsed.geometry)


def check_decodable(model, parsed: Parsed, limits: Limits = Limits(), name: str = "file") -> None:
    _, grid, _ = denoise_plan(model, parsed.fields, parsed.header.params)
    check_work(model, parsed.header.height, parsed.header.width, parsed.fields.steps, len(grid) - 1, limits, name)

