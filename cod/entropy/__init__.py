"""Entropy coding: integer probability tables (`tables`) and the interleaved rANS coder (`rans`); docs/entropy.md
specifies the byte format. The coding loops are compiled on the CPU (`cod.kernels.rans_cpu`, NumPy reference in
`rans`). The batched GPU coder producing the same bytes is `cod.kernels.rans`."""
from __future__ import annotations

from .rans import Decoder, StreamError, decode, default_lanes, encode, encode_frequencies, frequencies
from .tables import PRECISION, cdf_from_freqs, ideal_bits, quantize_pmf

__all__ = ["PRECISION", "quantize_pmf", "cdf_from_freqs", "ideal_bits", "encode", "decode", "Decoder",
           "StreamError", "default_lanes", "frequencies", "encode_frequencies"]
