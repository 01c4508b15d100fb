"""Numeric precision of the decode side: the one place for the dtype policy, how modules are converted, and what
a device can run.

    fp32  everything in float32 (the reference; the release's fixtures are float32)
    bf16  the decode side's weights and activations in bfloat16 (weights converted, not autocast)
    int8  bf16, and the transformer's linear layers int8 through torchao: int8 per-channel weights and int8
          activations quantised per token at run time (Int8DynamicActivationInt8WeightConfig)
    fp8   bf16, and the transformer's linear layers float8 (e4m3) through torchao: dynamic per-row activation and
          weight scales (Float8DynamicActivationFloat8WeightConfig); CUDA devices of compute capability >= 8.9.
          COD_FP8=scaled_mm builds the same arithmetic as plain tensors on torch._scaled_mm (cod.kernels.fp8)

What never changes with the precision: the condition encoder and the VQ codebook search (compress). Their output,
the indices, is the bitstream, so it must not depend on how a model was loaded (tests/test_precision.py).

What a reduced precision converts: the work done at every sampling step, i.e. the denoiser's condition stream and
decoder (`s_embedder`, `x_embedder`, `y_embedder_x`, `blocks`, `final_layer`). What it keeps in float32, and why
(docs/precision.md measures each choice):
  - what runs once per image: the condition decoder (`y_embedder.decoder`, whose map conditions every step) and a
    latent model's VAE decoder (which makes the pixels). In bf16 each cost 6-7 dB of PSNR against the float32
    decode on the tiny presets, for a small share of the decode time;
  - the sampler's state and arithmetic (x, the Adams history, guidance): the velocity leaves the network in
    float32 and every update is float32, so rounding does not accumulate over the steps;
  - the time embedding (`t_embedder`: a few hundred multiply-adds per step, feeding every block's modulation) and
    the layer whose output is the velocity (`final_layer.linear`: 3 or 16 outputs per token).
Conversions at the boundaries between float32 and reduced-precision modules are forward hooks registered here, so
the model files read the same in every precision.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from cod.errors import PrecisionError

PRECISIONS = ("fp32", "bf16", "int8", "fp8")
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with float8 tensor cores (torch._scaled_mm)


@dataclass(frozen=True)
class Policy:
    """What one precision does to the decode side."""

    compute: torch.dtype                   # weights and activations of the converted modules
    quantize: str | None = None            # "int8" / "fp8": torchao on the converted modules' linear layers
    keep_fp32: tuple[str, ...] = ()        # denoiser submodules left in float32 (boundary hooks cast around them)


# The decode side of a denoiser, in forward order (submodules a model lacks are skipped: DDT has no y_embedder_x,
# only CoD-Lite's DConv has the per-pixel MLP `dec_net`).
# The condition encoder and the codebook (`y_embedder.encoder`, `y_embedder.bottleneck`) are never listed:
# compress runs them. KEEP_FP32 lists what stays float32 within it (the module docstring says why).
DECODE_MODULES = ("y_embedder.decoder", "t_embedder", "s_embedder", "x_embedder", "y_embedder_x", "blocks",
                  "dec_net", "final_layer")
KEEP_FP32 = ("y_embedder.decoder", "t_embedder", "final_layer.linear")
POLICIES = {
    "fp32": Policy(torch.float32),
    "bf16": Policy(torch.bfloat16, None, KEEP_FP32),
    "int8": Policy(torch.bfloat16, "int8", KEEP_FP32),
    "fp8": Policy(torch.bfloat16, "fp8", KEEP_FP32),
}


# --------------------------------------------------------------------------------------------------------------
# What a device can run
# --------------------------------------------------------------------------------------------------------------
def check_precision(precision: str, device: torch.device | str = "cpu") -> None:
    """Raise PrecisionError (one line: what, why, what to use instead) unless `device` can decode in `precision`."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "fp8":
        if device.type != "cuda":
            raise PrecisionError(f"precision fp8 needs a CUDA GPU of compute capability "
                                 f"{'.'.join(map(str, FP8_MIN_CAPABILITY))} or later (Ada, Hopper), not a "
                                 f"{device.type} device: use bf16 or int8")
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise PrecisionError(f"precision fp8 needs a CUDA GPU of compute capability "
                                 f"{'.'.join(map(str, FP8_MIN_CAPABILITY))} or later; "
                                 f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: "
                                 f"use bf16 or int8")
    if precision in ("bf16", "int8", "fp8") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"precision {precision} computes in bfloat16, which {torch.cuda.get_device_name(device)} "
                             f"does not support: use fp32")
    if POLICIES[precision].quantize == "int8" or (precision == "fp8" and fp8_backend() == "torchao"):
        _torchao()


@contextlib.contextmanager
def _quiet_torchao():
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pytree_log.setLevel(level)


def _torchao():
    """torchao's quantisation API, imported only when a quantised precision is asked for (it is slow to import and
    logs a warning about one of its enums through torch's logger)."""
    try:
        with _quiet_torchao():
            import torchao.quantization as quantization
    except ImportError as e:
        raise PrecisionError(f"precisions int8 and fp8 need torchao (pip install torchao==0.18.0): {e}") from None
    return quantization


# --------------------------------------------------------------------------------------------------------------
# Converting a model
# --------------------------------------------------------------------------------------------------------------
def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def cast_inputs(module: nn.Module, dtype: torch.dtype) -> None:
    """module's floating-point positional inputs reach it in dtype."""
    module.register_forward_pre_hook(lambda _m, args: _cast(args, dtype))


def cast_output(module: nn.Module, dtype: torch.dtype, first_only: bool = False) -> None:
    """module's floating-point output (or the first element of a tuple output) leaves it in dtype."""
    def hook(_m, _args, out):
        if first_only:
            return (_cast(out[0], dtype), *out[1:])
        return _cast(out, dtype)

    module.register_forward_hook(hook)


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


FP8_BACKENDS = ("torchao", "scaled_mm")


def fp8_backend() -> str:
    """How fp8 linear layers are built: "torchao" (the default: its float8 tensor subclass) or "scaled_mm" (the
    same per-row arithmetic as plain tensors on torch._scaled_mm, cod.kernels.fp8), from the environment variable
    COD_FP8, read when a model is converted."""
    backend = os.environ.get("COD_FP8", "torchao").strip().lower() or "torchao"
    if backend not in FP8_BACKENDS:
        raise PrecisionError(f"COD_FP8 must be one of {', '.join(FP8_BACKENDS)}, not '{os.environ['COD_FP8']}'")
    return backend


def quantize_linears(module: nn.Module, kind: str, include=("",), exclude=()) -> None:
    """Quantise the linear layers of module whose qualified names lie within `include` and not within `exclude`:
    int8 through torchao (int8 activations per token, int8 weights per channel) or fp8 (e4m3, per-row scales;
    only layers with both sides a multiple of 16, as the scaled matrix product needs) through torchao or
    cod.kernels.fp8 (fp8_backend)."""
    if kind not in ("int8", "fp8"):
        raise ValueError(f"unknown quantisation '{kind}'")

    def chosen(layer: nn.Module, name: str) -> bool:
        if not isinstance(layer, nn.Linear) or _within(name, exclude):
            return False
        if not (include == ("",) or _within(name, include)):
            return False
        return kind != "fp8" or (layer.in_features % 16 == 0 and layer.out_features % 16 == 0)

    if kind == "fp8" and fp8_backend() == "scaled_mm":
        from cod.kernels import fp8

        fp8.swap_linears(module, chosen)
        return
    q = _torchao()
    if kind == "int8":
        config = q.Int8DynamicActivationInt8WeightConfig()
    else:
        config = q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow())
    with _quiet_torchao():
        q.quantize_(module, config, filter_fn=chosen)


# The layer whose output is the velocity: kept in float32, its output is never rounded to the compute dtype.
VELOCITY_LAYER = "final_layer.linear"
# NerfEmbedder applies column blocks of its weight separately (cod/models/pixnerdit.py), which a quantised
# weight tensor does not support: it stays in the compute dtype.
NOT_QUANTIZED = ("x_embedder",)


def prepare_denoiser(denoiser: nn.Module, precision: str, policy: Policy | None = None) -> nn.Module:
    """Convert a float32 denoiser's decode side to `precision` in place (see the module docstring); returns it.

    After this the denoiser takes float32 x and condition maps and returns a float32 velocity in every precision;
    the condition encoder and codebook are untouched."""
    policy = policy or POLICIES[precision]
    if policy.compute == torch.float32 and policy.quantize is None:
        return denoiser
    low = policy.compute
    groups = tuple(n for n in DECODE_MODULES if _has(denoiser, n))  # DDT has no y_embedder_x
    keep = tuple(n for n in policy.keep_fp32 if _has(denoiser, n))
    for group in groups:
        for name, module in denoiser.get_submodule(group).named_modules(prefix=group):
            if not _within(name, keep):
                module._apply(lambda t: t.to(low) if t.is_floating_point() else t, recurse=False)
    for name in keep:
        module = denoiser.get_submodule(name)
        cast_inputs(module, torch.float32)
        if name != VELOCITY_LAYER:
            cast_output(module, low)

    def enter(_m, args, kwargs):  # x and a precomputed condition map in the compute dtype; t stays float32
        return (_cast(args[0], low), *args[1:]), {k: _cast(v, low) if k == "cond" else v for k, v in kwargs.items()}

    denoiser.register_forward_pre_hook(enter, with_kwargs=True)
    cast_output(denoiser, torch.float32, first_only=True)  # the velocity (the condition map stays as it is)
    if policy.quantize is not None:
        quantize_linears(denoiser, policy.quantize, include=groups, exclude=keep + NOT_QUANTIZED)
    return denoiser
