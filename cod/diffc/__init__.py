"""DiffC on CoD: zero-shot variable-rate coding by reverse-channel coding of the noisy diffusion states.

Layers, bottom up: philox (shared randomness) and tables (shipped integer tables); layout (budgets, chunks,
partition); pfr (candidate selection and regeneration); stream (the entropy-coded symbols); algebra (one step
in CoD's flow time); codec (encoder/decoder loop and the payload). See docs/diffc.md.
"""

__all__ = ["compress", "decompress", "parse", "decode_sample"]


def __getattr__(name: str):
    # `cod.diffc.compress(model, image, steps=...)` without importing torch-side modules on `import cod.diffc`
    if name in __all__:
        from cod.diffc import codec

        return getattr(codec, name)
    raise AttributeError(name)
