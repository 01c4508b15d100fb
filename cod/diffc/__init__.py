"""DiffC on CoD: zero-shot variable-rate coding by reverse-channel coding of the noisy diffusion states.

Layers, bottom up: philox (shared randomness) and tables (shipped integer tables); layout (budgets, chunks,
partition); pfr (candidate selection and regeneration); stream (the entropy-coded symbols); algebra (one step
in CoD's flow time); codec (encoder/decoder loop and the payload). See docs/diffc.md.
"""
