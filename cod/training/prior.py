"""`cod fit-prior`: train a model directory's index prior (the entropy bottleneck) on the indices of its frozen CoD.

The CoD itself does not change: its encoder turns training crops into index grids once, the prior (a
LightningModule of its own, `PriorTrainingModule`) learns to predict them, logging bits per token to TensorBoard,
and the frozen integer tables are added to the model directory as prior.safetensors (cod.model.write_prior).
Files written before stay decodable; files written after are entropy-coded when that makes them smaller.
Settings come from conf/prior.yaml (every key can be overridden on the command line).
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from cod.entropy.priors import ContextPrior, IndexPrior, build_prior
from cod.errors import InputError, OutputExistsError

# name: (type, default, lowest allowed). conf/prior.yaml spells out the same defaults (a test keeps them equal).
SETTINGS = {
    "kind": (str, "context", None),
    "dim": (int, 32, 1),
    "size": (int, 256, 16),
    "crops": (int, 1, 1),
    "batch_size": (int, 32, 1),
    "steps": (int, 1500, 1),
    "lr": (float, 0.03, 0.0),
    "seed": (int, 0, 0),
    "val_every": (int, 250, 1),
}


class PriorTrainingModule(L.LightningModule):
    """The entropy bottleneck as a LightningModule: an index prior trained by maximum likelihood on index grids."""

    def __init__(self, prior: IndexPrior, lr: float = 0.03):
        super().__init__()
        self.prior, self.lr = prior, lr
        self.best: tuple[float, int, dict] | None = None  # (held-out bits per token, step, parameters)

    def training_step(self, grids: torch.Tensor, batch_idx: int) -> torch.Tensor:
        bits = self.prior.bits(grids).mean()
        self.log("train/bits_per_token", bits, prog_bar=False)
        return bits * math.log(2)  # nats: the same optimum, the usual gradient scale

    def on_validation_epoch_start(self) -> None:
        self._val_bits, self._val_count = 0.0, 0

    def validation_step(self, grids: torch.Tensor, batch_idx: int) -> None:
        bits = self.prior.bits(grids)
        self._val_bits += float(bits.sum())
        self._val_count += bits.numel()
        self.log("val/bits_per_token", bits.mean(), prog_bar=False)

    def on_validation_epoch_end(self) -> None:
        """Keep the parameters with the fewest held-out bits so far (a context prior can overfit a small
        training set: the held-out figure, not the step count, decides what is kept)."""
        value = self._val_bits / max(1, self._val_count)
        if self.best is None or value < self.best[0]:
            self.best = (value, self.global_step, copy.deepcopy(self.prior.state_dict()))

    def configure_optimizers(self):
        return torch.optim.Adam(self.prior.parameters(), lr=self.lr)


ENCODE_BATCH = 16


@torch.no_grad()
def encode_folder(model, source: str, size: int, crops: int, train: bool, seed: int) -> torch.Tensor:
    """Index grids [N, h, w] of `crops` crops per image of `source` (random crops for training, one centre crop
    for validation), encoded by the frozen model in batches. For a local folder the grids are remembered in the
    user's private cache (grid_cache_key: the model's weights, every file's identity and the crop settings), so
    that training another prior on the same data does not encode it again."""
    from cod.training.data import FolderDataset, build_dataset

    dataset = build_dataset(source, size, train=train, seed=seed)
    key = grid_cache_key(model, dataset, size, crops, train, seed) if isinstance(dataset, FolderDataset) else None
    cached = _read_grid_cache(key, model.codec.bottleneck.num_codes) if key else None
    if cached is not None:
        return cached
    grids, batch = [], []

    def flush():
        if batch:
            grids.extend(model.encode(torch.stack(batch)).cpu())
            batch.clear()

    for epoch in range(crops if train else 1):
        for i in range(len(dataset)):
            item = dataset[(i, epoch)]
            if item is not None:
                batch.append(item[0])
                if len(batch) == ENCODE_BATCH:
                    flush()
    flush()
    if not grids:
        raise InputError(f"{source}: no readable images to train the prior on")
    grids = torch.stack(grids)
    if key:
        _write_grid_cache(key, grids)
    return grids


def grid_cache_key(model, dataset, size: int, crops: int, train: bool, seed: int) -> str:
    """sha256 of what the grids depend on: the model's weights (fingerprint) and code geometry, each image file's
    identity (path, device, inode, size, mtime and ctime: any rewrite changes it), and the crop settings."""
    import hashlib
    import json
    import os

    files = []
    for path in dataset.files:
        st = os.stat(path)
        files.append([str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    blob = json.dumps({"model": model.fingerprint, "stride": model.codec.stride, "bits": model.codec.bits,
                       "size": size, "crops": crops, "train": train, "seed": seed, "files": files, "version": 1})
    return hashlib.sha256(blob.encode()).hexdigest()


def _grid_cache_file(key: str) -> Path | None:
    from cod.files import private_cache_dir

    folder = private_cache_dir()
    return None if folder is None else folder / "prior-grids" / f"{key}.safetensors"


def _read_grid_cache(key: str, num_codes: int) -> torch.Tensor | None:
    """The cached grids, or None (no private cache, no entry, or an entry that is not a valid grid tensor)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = _grid_cache_file(key)
    if path is None or not path.is_file():
        return None
    try:
        grids = load(path.read_bytes()).get("grids")
    except (OSError, SafetensorError, ValueError):
        return None
    if grids is None or grids.dtype != torch.int64 or grids.dim() != 3 or grids.numel() == 0 \
            or grids.min() < 0 or grids.max() >= num_codes:
        return None
    return grids


def _write_grid_cache(key: str, grids: torch.Tensor) -> None:
    from safetensors.torch import save

    from cod.files import atomic_write_bytes

    path = _grid_cache_file(key)
    if path is None:
        return
    try:
        path.parent.mkdir(exist_ok=True, mode=0o700)
        atomic_write_bytes(path, save({"grids": grids.contiguous()}), overwrite=True)
    except OSError:
        pass  # a cache that cannot be written is no cache


def initial_prior(kind: str, model, grids: torch.Tensor, dim: int) -> IndexPrior:
    """A prior started from the training indices' frequencies (so training refines, rather than discovers, the
    static distribution)."""
    num_codes = model.codec.bottleneck.num_codes
    prior = build_prior(kind, num_codes, **({"dim": dim} if kind == "context" else {}))
    counts = torch.bincount(grids.reshape(-1), minlength=num_codes).double() + 0.5
    log_freq = (counts / counts.sum()).log().float()
    with torch.no_grad():
        if isinstance(prior, ContextPrior):
            prior.base.copy_(log_freq.expand_as(prior.base))
        else:
            prior.logits.copy_(log_freq)
    return prior


def measure(prior: IndexPrior, grids: torch.Tensor, bits: int) -> dict:
    """Bits per token under the frozen integer tables (what files spend, before the coder's few bytes)."""
    total = sum(prior.table_bits(g.numpy()) for g in grids)
    tokens = grids.numel()
    return {"tokens": tokens, "bits_per_token": total / tokens, "fixed_bits_per_token": bits,
            "saving": 1 - total / (tokens * bits)}


def load_settings(config: str | None, overrides: dict) -> dict:
    from cod.files import load_yaml, read_bytes_bounded
    from cod.model_config import MAX_CONFIG_BYTES

    path = Path(config) if config else Path("the defaults")
    data = load_yaml(read_bytes_bounded(path, MAX_CONFIG_BYTES, "config file"), str(path)) or {} if config else {}
    if not isinstance(data, dict) or set(data) - set(SETTINGS):
        unknown = sorted(set(data) - set(SETTINGS)) if isinstance(data, dict) else data
        raise InputError(f"{path}: unknown settings {unknown} (allowed: {', '.join(SETTINGS)})")
    settings = {k: default for k, (_, default, _) in SETTINGS.items()}
    settings.update(data)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    for key, (kind, _, low) in SETTINGS.items():
        value = settings[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = settings[key] = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or (low is not None and value < low):
            raise InputError(f"{path}: {key} must be {'a' if kind is str else 'a number' if kind is float else 'an'} "
                             f"{kind.__name__}{f' >= {low}' if low is not None else ''}, got {value!r}")
    if settings["kind"] not in ("static", "context"):
        raise InputError(f"{path}: kind must be 'static' or 'context', got {settings['kind']!r}")
    return settings


def fit_prior(model_dir: str, train: str, val: str | None = None, config: str | None = None,
              log_dir: str = "runs", overwrite: bool = False, say=print, **overrides) -> dict:
    """Train and write a model directory's prior; returns the report (train and held-out bits per token)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    import cod
    from cod.model import read_config, write_prior

    settings = load_settings(config, overrides)
    if read_config(model_dir).get("prior") is not None and not overwrite:  # before any work
        raise OutputExistsError(f"{model_dir} already has an index prior (prior.safetensors); pass --overwrite to "
                                f"replace it (files entropy-coded with the old prior will no longer decode)")
    model = cod.load(model_dir)
    bits = model.codec.bits
    torch.manual_seed(settings["seed"])
    say(f"encoding training crops of {train} ({settings['crops']} per image, {settings['size']} px)")
    grids = encode_folder(model, train, settings["size"], settings["crops"], True, settings["seed"])
    held_out = encode_folder(model, val, settings["size"], 1, False, settings["seed"]) if val else None
    say(f"{len(grids)} grids of {tuple(grids.shape[1:])} indices ({bits} bits each); training a {settings['kind']} "
        f"prior for {settings['steps']} steps")
    prior = initial_prior(settings["kind"], model, grids, settings["dim"])
    module = PriorTrainingModule(prior, settings["lr"])
    loader = DataLoader(grids, batch_size=settings["batch_size"],
                        sampler=RandomSampler(grids, replacement=True,
                                              num_samples=settings["steps"] * settings["batch_size"],
                                              generator=torch.Generator().manual_seed(settings["seed"])))
    val_loader = DataLoader(held_out if held_out is not None else grids[:256], batch_size=256)
    from cod.training.commands import quiet_third_party

    with quiet_third_party():
        trainer = L.Trainer(max_steps=settings["steps"], accelerator="cpu", devices=1, logger=TensorBoardLogger(
            log_dir, name="prior"), enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            val_check_interval=min(settings["val_every"], settings["steps"]), check_val_every_n_epoch=None,
            log_every_n_steps=min(50, settings["steps"]), num_sanity_val_steps=0, deterministic=True)
        trainer.validate(module, val_loader, verbose=False)  # the starting point (the static frequencies) competes too
        trainer.fit(module, loader, val_loader)
        trainer.validate(module, val_loader, verbose=False)
    best_bits, best_step, best_state = module.best
    prior.load_state_dict(best_state)
    say(f"kept the parameters of step {best_step} ({best_bits:.3f} bits per token on the "
        f"{'held-out' if held_out is not None else 'first training'} grids)")
    prior.freeze()
    report = {"kind": prior.kind, "settings": settings, "kept_step": best_step, "train": measure(prior, grids, bits)}
    if held_out is not None:
        report["held_out"] = measure(prior, held_out, bits)
    fingerprint = write_prior(model_dir, prior.eval(), overwrite=overwrite)
    report["prior_sha256"] = fingerprint
    for part in ("train", "held_out"):
        if part in report:
            r = report[part]
            say(f"{part}: {r['bits_per_token']:.3f} bits per token vs {bits} fixed ({100 * r['saving']:.1f}% fewer "
                f"payload bits) over {r['tokens']} tokens")
    say(f"wrote {Path(model_dir) / 'prior.safetensors'} (sha256 {fingerprint[:16]}...); TensorBoard logs in "
        f"{trainer.logger.log_dir}")
    return report


def _cmd_fit_prior(args) -> None:
    overrides = {k: getattr(args, k) for k in SETTINGS if getattr(args, k, None) is not None}
    say = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    fit_prior(args.model, args.data, args.val, args.config, args.log_dir, args.overwrite, say=say, **overrides)


def register(sub) -> None:
    from cod.codec.commands import non_negative_int, positive_int

    p = sub.add_parser("fit-prior", help="train the index prior (entropy bottleneck) of a model directory")
    p.add_argument("--model", required=True, help="model directory (its CoD stays frozen; prior.safetensors is "
                                                   "added to it)")
    p.add_argument("--data", required=True, help="training images: a folder, tar:PATTERN or hf:NAME")
    p.add_argument("--val", help="held-out images to report bits per token on")
    p.add_argument("--config", help=f"settings YAML (default: conf/prior.yaml; keys {', '.join(SETTINGS)})")
    p.add_argument("--kind", choices=["static", "context"], help="static distribution or 2x2 context model")
    p.add_argument("--dim", type=positive_int, help="context prior: width of the neighbour embeddings")
    p.add_argument("--steps", type=positive_int, help="optimizer steps")
    p.add_argument("--size", type=positive_int, help="crop size in pixels")
    p.add_argument("--crops", type=positive_int, help="random crops per training image")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("--log-dir", default="runs", help="TensorBoard logs go to LOG_DIR/prior/version_N")
    p.add_argument("--overwrite", action="store_true", help="replace the directory's existing prior")
    p.set_defaults(func=_cmd_fit_prior)
