"""Training data: local image folders, Hugging Face `datasets` (imagefolder, parquet, streaming) and tar shards,
with the paper's crop policy. Unreadable images are skipped and counted, never a crash.

Sources (the `train` / `val` strings of ImageDataModule):
  /path/to/folder                      every image below it (recursive)
  hf:imagefolder:/path/to/folder       Hugging Face imagefolder; hf:parquet:/path/*.parquet; hf:NAME (local cache)
  hf-stream:...                        the same, streamed (an IterableDataset, sharded by rank and worker)
  tar:/path/shard-{000..009}.tar       webdataset-style tar shards (image members), sharded by rank and worker
"""
from __future__ import annotations

import glob
import random
import re
import tarfile
import warnings
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from cod.errors import InputError
from cod.files import read_bytes_bounded
from cod.images import IMAGE_SUFFIXES, decode_image

# A training image larger than this is skipped as unreadable (checked from its header, before decoding, and again
# for the size it would be resized to): crops are at most a few hundred pixels, and one 100-megapixel image would
# take gigabytes per dataloader worker. Files (and tar members) are read only up to MAX_TRAIN_FILE_BYTES.
MAX_TRAIN_PIXELS = 1 << 26
MAX_TRAIN_FILE_BYTES = 256 << 20
MAX_SHARDS = 1_000_000


class SkipCounter:
    """Counts unreadable images (per process) so that the module can log them."""

    skipped = 0

    @classmethod
    def note(cls, name: str, error: Exception) -> None:
        cls.skipped += 1
        if cls.skipped <= 10:
            warnings.warn(f"skipping unreadable image {name}: {error}", stacklevel=3)


def crop(image: np.ndarray, size: int, train: bool, rng: random.Random) -> torch.Tensor | None:
    """The paper's policy: resize the short side up to `size` only when smaller (bicubic), then a random crop
    for training or a centre crop for validation. -> [3, size, size] in [0, 1]."""
    h, w = image.shape[:2]
    if min(h, w) < size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if nh * nw > MAX_TRAIN_PIXELS:  # a 1x16384 strip would become 256x4194304
            raise ValueError(f"{h}x{w} would be resized to {nh}x{nw} for {size}-pixel crops, over "
                             f"{MAX_TRAIN_PIXELS} pixels")
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
        h, w = nh, nw
    top = rng.randint(0, h - size) if train else (h - size) // 2
    left = rng.randint(0, w - size) if train else (w - size) // 2
    patch = image[top:top + size, left:left + size]
    return torch.from_numpy(np.array(patch, order="C")).permute(2, 0, 1).float().div(255)  # a copy: never read-only


def crop_or_skip(image: np.ndarray | None, size: int, train: bool, rng: random.Random,
                 name: str) -> torch.Tensor | None:
    """crop(), or None (skipped and counted) for no image or one too large to crop."""
    if image is None:
        return None
    try:
        return crop(image, size, train, rng)
    except ValueError as e:
        SkipCounter.note(name, e)
        return None


def decode_bytes(data: bytes, name: str) -> np.ndarray | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return decode_image(data, name, MAX_TRAIN_PIXELS)
    except Exception as e:  # noqa: BLE001 - any undecodable image is skipped, whatever the decoder raised
        SkipCounter.note(name, e)
        return None


def _split_key(key) -> tuple[int, int]:
    """Map-style keys are (index, epoch) from EpochSampler, or a plain index (validation, Subset)."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)


def _crop_rng(seed: int, epoch: int, index: int, train: bool) -> random.Random:
    """Training crops are a function of (seed, epoch, index): new every epoch, reproducible, resumable, and the
    same in every dataloader worker (the epoch travels with the key, not as dataset state)."""
    return random.Random(hash((seed, epoch, index)) if train else index)


def read_image_bytes(path: Path) -> bytes | None:
    """A training image's bytes, or None (skipped and counted) when it cannot be read: gone, a broken link, not a
    regular file, unreadable, or larger than any image file cod reads."""
    try:
        return read_bytes_bounded(path, MAX_TRAIN_FILE_BYTES, "training image file")
    except (InputError, OSError) as e:
        SkipCounter.note(str(path), e)
        return None


class FolderDataset(Dataset):
    """Every image file below `root`. cache=True keeps the decoded images in memory (each dataloader worker holds
    its own copy): for small datasets read many times, e.g. the embedded demo model's training on a GPU."""

    def __init__(self, root: str, size: int, train: bool = True, seed: int = 0, cache: bool = False):
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FileNotFoundError(f"training data folder {root} does not exist (set data.train in the config)")
        candidates = sorted(p for p in root_path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.files = [p for p in candidates if p.is_file()]  # not a directory named x.png, not a broken link
        if len(self.files) < len(candidates):
            odd = [str(p) for p in candidates if not p.is_file()]
            warnings.warn(f"{root}: skipping {len(odd)} entries that are not image files ({', '.join(odd[:3])}"
                          f"{', ...' if len(odd) > 3 else ''})", stacklevel=2)
        if not self.files:
            raise ValueError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.size, self.train, self.seed = size, train, seed
        self.cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, i: int) -> np.ndarray | None:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        data = read_image_bytes(self.files[i])
        image = None if data is None else decode_bytes(data, str(self.files[i]))
        if self.cache is not None and image is not None:
            self.cache[i] = image
        return image

    def __getitem__(self, key):
        i, epoch = _split_key(key)
        rng = _crop_rng(self.seed, epoch, i, self.train)
        patch = crop_or_skip(self._image(i), self.size, self.train, rng, str(self.files[i]))
        return None if patch is None else (patch, i)


class HFDataset(Dataset):
    def __init__(self, spec: str, size: int, train: bool = True, split: str = "train", seed: int = 0):
        import datasets

        builder, _, path = spec.partition(":")
        if builder in ("imagefolder", "parquet"):
            files = {"data_dir": path} if builder == "imagefolder" else {"data_files": sorted(glob.glob(path))}
            self.ds = datasets.load_dataset(builder, split=split, **files)
        else:
            self.ds = datasets.load_dataset(spec, split=split)
        self.key = next((k for k, f in self.ds.features.items() if isinstance(f, datasets.Image)), "image")
        self.ds = self.ds.cast_column(self.key, datasets.Image(decode=False))
        self.size, self.train, self.seed = size, train, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        i, epoch = _split_key(key)
        item = self.ds[i][self.key]
        data = item["bytes"] if item.get("bytes") else read_image_bytes(Path(item["path"]))
        image = None if data is None else decode_bytes(data, f"{self.key}[{i}]")
        rng = _crop_rng(self.seed, epoch, i, self.train)
        patch = crop_or_skip(image, self.size, self.train, rng, f"{self.key}[{i}]")
        return None if patch is None else (patch, i)


def _shard(items: list, rank: int, world: int) -> list:
    """Deterministic split across (rank, dataloader worker): every item exactly once per pass."""
    info = get_worker_info()
    workers, wid = (info.num_workers, info.id) if info else (1, 0)
    return items[rank * workers + wid:: world * workers]


def expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return sorted(glob.glob(pattern)) or [pattern]
    lo, hi, width = int(m[1]), int(m[2]), len(m[1])
    if hi - lo + 1 > MAX_SHARDS:
        raise ValueError(f"tar:{pattern} names {hi - lo + 1} shards, more than {MAX_SHARDS}")
    return [pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():] for i in range(lo, hi + 1)]


MAX_TAR_MEMBERS = 10_000_000
MAX_TAR_HEADER_BYTES = 64 << 10


class BoundedTarInfo(tarfile.TarInfo):
    """A tar member header whose GNU long-name and PAX extensions are bounded (tarfile reads them whole)."""

    def _proc_gnulong(self, tarfile_):
        if self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.HeaderError(f"a {self.size}-byte long-name header")
        return super()._proc_gnulong(tarfile_)

    def _proc_pax(self, tarfile_):
        if self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.HeaderError(f"a {self.size}-byte PAX header")
        return super()._proc_pax(tarfile_)


class TarShards(IterableDataset):
    def __init__(self, pattern: str, size: int, train: bool = True, seed: int = 0, rank: int = 0, world: int = 1):
        self.shards = expand_braces(pattern)
        missing = [s for s in self.shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"tar shard(s) not found: {missing[:3]}")
        self.size, self.train, self.seed, self.rank, self.world = size, train, seed, rank, world

    def __iter__(self):
        rng = random.Random(hash((self.seed, self.rank)))
        shards = list(self.shards)
        if self.train:
            rng.shuffle(shards)
        for shard in _shard(shards, self.rank, self.world):
            try:
                yield from self._shard_samples(shard, rng)
            except (tarfile.TarError, OSError, EOFError) as e:  # a damaged shard: the rest of it is skipped
                SkipCounter.note(shard, e)

    def _shard_samples(self, shard: str, rng: random.Random):
        # streaming mode keeps no list of members; BoundedTarInfo refuses oversized long-name/PAX headers, which
        # tarfile would otherwise read whole into memory
        with tarfile.open(shard, mode="r|*", tarinfo=BoundedTarInfo) as tar:
            for n, member in enumerate(tar):
                if n >= MAX_TAR_MEMBERS:
                    SkipCounter.note(shard, ValueError(f"more than {MAX_TAR_MEMBERS} members; the rest skipped"))
                    return
                if not (member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES):
                    continue
                name = f"{shard}:{member.name}"
                if member.size > MAX_TRAIN_FILE_BYTES or member.issparse():  # bounded before any byte is read
                    SkipCounter.note(name, ValueError(f"a {member.size}-byte member (sparse or over "
                                                      f"{MAX_TRAIN_FILE_BYTES} bytes)"))
                    continue
                data = tar.extractfile(member).read(MAX_TRAIN_FILE_BYTES + 1)
                patch = crop_or_skip(decode_bytes(data, name), self.size, self.train, rng, name)
                if patch is not None:
                    yield patch, zlib.crc32(name.encode())


class HFStream(IterableDataset):
    def __init__(self, spec: str, size: int, train: bool = True, seed: int = 0, rank: int = 0, world: int = 1):
        self.spec, self.size, self.train, self.seed, self.rank, self.world = spec, size, train, seed, rank, world

    def __iter__(self):
        import datasets

        builder, _, path = self.spec.partition(":")
        kwargs = {"data_dir": path} if builder == "imagefolder" else (
            {"data_files": sorted(glob.glob(path))} if builder == "parquet" else {})
        ds = datasets.load_dataset(builder if kwargs else self.spec, split="train", streaming=True, **kwargs)
        key = next((k for k, f in (ds.features or {}).items() if isinstance(f, datasets.Image)), None)
        if key is not None:  # undecoded: the bytes go through cod's own checks (formats, sizes, structure)
            ds = ds.cast_column(key, datasets.Image(decode=False))
        rng = random.Random(hash((self.seed, self.rank)))
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        for i, item in enumerate(ds):
            if i % (self.world * workers) != self.rank * workers + wid:
                continue
            value = item.get(key) if key is not None else None
            if not isinstance(value, dict):
                continue
            name = f"{self.spec}[{i}]"
            data = value.get("bytes") or (read_image_bytes(Path(value["path"])) if value.get("path") else None)
            patch = crop_or_skip(None if data is None else decode_bytes(data, name), self.size, self.train, rng, name)
            if patch is not None:
                yield patch, i


def build_dataset(source: str, size: int, train: bool, seed: int = 0, rank: int = 0, world: int = 1,
                  cache: bool = False):
    if source.startswith("hf-stream:"):
        return HFStream(source[len("hf-stream:"):], size, train, seed, rank, world)
    if source.startswith("hf:"):
        return HFDataset(source[3:], size, train, seed=seed)
    if source.startswith("tar:"):
        return TarShards(source[4:], size, train, seed, rank, world)
    return FolderDataset(source, size, train, seed, cache=cache)


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, sample id) pairs -> (images [B,3,S,S], ids [B]), dropping unreadable (None) items. The ids seed
    each sample's training noise, so the noise does not depend on how samples are split into batches/ranks."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack([b[0] for b in kept]), torch.tensor([b[1] for b in kept], dtype=torch.long)


class EpochSampler(Sampler[tuple[int, int]]):
    """Sample order as a function of (seed, epoch) alone, sharded rank::world, resumable mid-epoch; yields
    (index, epoch) keys so that the dataset's crops change with the epoch.

    Every rank draws the same permutation and takes every world-th index, so one process with the global batch
    sees, step by step, the union of what the ranks see. `skip` drops the samples consumed before a resume.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __iter__(self):
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
                 if self.shuffle else list(range(self.n)))
        skip, self.skip = self.skip, 0
        return iter((i, self.epoch) for i in order[self.rank:: self.world][skip:])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world)) - self.skip


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch goes into Lightning checkpoints (state_dict / load_state_dict), so
    that a run resumed after a crash continues with the very batch it would have trained next."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._consumed = 0

    def __iter__(self):
        self._consumed = self.sampler.skip
        for batch in super().__iter__():
            self._consumed += self.batch_size
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = state["consumed"]
        self._consumed = state["consumed"]


class ImageDataModule(L.LightningDataModule):
    """cache: keep decoded training images in memory (local folders only; for small datasets on fast devices)."""

    def __init__(self, train: str = "../shared/data/train256", val: str | None = None, size: int = 256,
                 batch_size: int = 8, val_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 val_images: int = 8, shuffle: bool = True, cache: bool = False):
        super().__init__()
        errors = [f"data.{name} must be {rule}, got {value!r}" for name, value, ok, rule in (
            ("size", size, isinstance(size, int) and 16 <= size <= 8192 and size % 16 == 0,
             "a multiple of 16 from 16 to 8192 (the crop side in pixels)"),
            ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "a positive integer"),
            ("val_batch_size", val_batch_size, val_batch_size is None or
             (isinstance(val_batch_size, int) and val_batch_size >= 1), "null or a positive integer"),
            ("num_workers", num_workers, isinstance(num_workers, int) and num_workers >= 0, "0 or more"),
            ("val_images", val_images, isinstance(val_images, int) and val_images >= 1, "a positive integer"),
        ) if not ok]
        if errors:
            raise ValueError("; ".join(errors))
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        h = self.hparams
        self.train_set = build_dataset(h.train, h.size, True, h.seed, rank, world, cache=h.cache)
        val = build_dataset(h.val or h.train, h.size, False, h.seed, rank, world)
        if isinstance(val, Dataset) and not isinstance(val, IterableDataset):
            val = torch.utils.data.Subset(val, range(min(h.val_images, len(val))))
        self.val_set = val

    def train_dataloader(self):
        h = self.hparams
        if isinstance(self.train_set, IterableDataset):  # shards are split by rank and worker in the dataset
            return DataLoader(self.train_set, batch_size=h.batch_size, num_workers=h.num_workers,
                              collate_fn=collate_skipping, drop_last=True, persistent_workers=h.num_workers > 0)
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        sampler = EpochSampler(len(self.train_set), h.shuffle, h.seed, rank, world)
        return ResumableDataLoader(self.train_set, batch_size=h.batch_size, sampler=sampler,
                                   num_workers=h.num_workers, collate_fn=collate_skipping, drop_last=True,
                                   persistent_workers=h.num_workers > 0)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.hparams.val_batch_size or self.hparams.batch_size,
                          num_workers=0, collate_fn=collate_skipping)
