"""Train streams and evaluation loaders for every dataset kind: `build_loaders` / `build_eval_loader`.

Three ways to make batches, picked per dataset:
- in-memory uint8 tensors (demo, CIFAR) with geometric augmentation only: whole batches augmented in the main
  process by BatchAugment (no workers, no per-image calls);
- files (ImageFolder), or in-memory data with RandAugment / random erasing: one torchvision v2 pipeline per image
  in DataLoader workers;
- WebDataset shards: streamed by the workers (see webdataset.py).
Unreadable images are skipped: each one is reported once on stderr (one line: path, reason), recorded in its
loader's SkipLog, and a run stops with the files named once more than max_bad_fraction of a dataset is unreadable.
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T

from ..models.registry import Preprocessing
from .augment import BatchAugment, MixUpCutMix
from .cifar import read_cifar
from .config import DataConfig
from .datasets import (
    Batch,
    SampleDataset,
    TensorImages,
    Unreadable,
    class_folders,
    collate,
    load_demo,
    scan_image_folder,
)
from .permute import FixedPermutation
from .sampling import (
    BATCH_AUGMENT,
    SAMPLE_AUGMENT,
    batches_per_epoch,
    epoch_order,
    eval_indices,
    generator,
    mix_seed,
    rank_slice,
)
from .transforms import build_eval_transform, build_train_transform
from .webdataset import ShardEvalDataset, ShardTrainDataset, scan_shards, shard_paths

Images = tuple[torch.Tensor, torch.Tensor]


class TooManyUnreadableImages(ValueError):
    """More than data.max_bad_fraction of a dataset's images cannot be read."""


class SkipLog:
    """The unreadable images of one dataset: a line on stderr the first time each is met, an error past the
    threshold."""

    def __init__(self, dataset: str, size: int | None, max_fraction: float):
        self.dataset, self.size, self.max_fraction = dataset, size, max_fraction
        self.reasons: dict[str, str] = {}

    def record(self, skipped: list[Unreadable]) -> None:
        for item in skipped:
            if item.id not in self.reasons:
                self.reasons[item.id] = item.reason
                reason = item.reason.splitlines()[0] if item.reason else "unreadable"
                print(f"allmlp: skipped unreadable image {item.id}: {reason}", file=sys.stderr, flush=True)
        if skipped and self.size:
            self.check(self.size)

    def check(self, size: int) -> None:
        """Raise once the skipped images are more than max_fraction of `size` images."""
        if len(self.reasons) > self.max_fraction * size:
            ids = list(self.reasons)
            shown = "\n  ".join(f"{i}: {self.reasons[i]}" for i in ids[:10])
            more = f"\n  ... and {len(ids) - 10} more" if len(ids) > 10 else ""
            raise TooManyUnreadableImages(
                f"{len(ids)} of {size} images of {self.dataset} are unreadable ({len(ids) / size:.2%}), more than "
                f"data.max_bad_fraction={self.max_fraction}; fix or remove them:\n  {shown}{more}"
            )

    def ids(self) -> list[str]:
        return list(self.reasons)


def _checked(batch: Batch, log: SkipLog, where: str) -> Images:
    log.record(batch.skipped)
    if batch.images is None:
        raise ValueError(f"every image of {where} is unreadable: {', '.join(s.id for s in batch.skipped)}")
    return batch.images, batch.targets


def _loader(dataset, num_workers: int, **kwargs) -> torch.utils.data.DataLoader:
    # An explicit generator: a DataLoader otherwise draws its worker seed from the global RNG, and the training
    # randomness (dropout, ...) would then depend on when loaders were created, breaking exact resumption.
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )


class TrainStream(ABC):
    """One rank's training batches. `batches(epoch, start)` yields batches start.. of the epoch; the order and all
    augmentation randomness are a pure function of (seed, epoch, rank, position), so a resumed run sees the same
    batches as an uninterrupted one. len() = batches per epoch (incomplete global batches are dropped)."""

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int, skip_log: SkipLog):
        self.batch_size, self.seed, self.skip_log = batch_size, seed, skip_log
        self.rank, self.world_size = rank, world_size

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _batches(self, epoch: int, start: int) -> Iterator[Images]: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[Images]:
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(start, int) and 0 <= start <= len(self)):
            raise ValueError(
                f"batches(epoch, start) needs epoch >= 0 and 0 <= start <= {len(self)}, got {epoch}, {start}"
            )
        return self._batches(epoch, start)

    def skipped(self) -> list[str]:
        return self.skip_log.ids()


class TensorTrainStream(TrainStream):
    """In-memory data, whole batches augmented at once; the random parameters of global batch j are drawn for all
    ranks from one generator and each rank takes its rows, so W ranks see what one process with W times the batch
    would see."""

    def __init__(self, data: TensorImages, augment: BatchAugment, permutation: FixedPermutation | None, **kwargs):
        super().__init__(**kwargs)
        self.data, self.augment, self.permutation = data, augment, permutation

    def __len__(self) -> int:
        return batches_per_epoch(len(self.data), self.batch_size, self.world_size)

    def _batches(self, epoch: int, start: int) -> Iterator[Images]:
        order = epoch_order(len(self.data), self.seed, epoch)
        global_batch, mine = self.batch_size * self.world_size, rank_slice(self.batch_size, self.rank)
        for j in range(start, len(self)):
            params = self.augment.sample(global_batch, generator(self.seed, BATCH_AUGMENT, epoch, j))
            indices = order[j * global_batch : (j + 1) * global_batch][mine]
            images = self.augment(self.data.images[indices], {k: v[mine] for k, v in params.items()})
            if self.permutation is not None:
                images = self.permutation(images)
            yield images, self.data.targets[indices]


class SampleTrainStream(TrainStream):
    """Per-image transforms in DataLoader workers; each image's randomness is seeded by its global position."""

    def __init__(self, dataset: SampleDataset, num_workers: int, **kwargs):
        super().__init__(**kwargs)
        self.dataset, self.num_workers = dataset, num_workers

    def __len__(self) -> int:
        return batches_per_epoch(len(self.dataset), self.batch_size, self.world_size)

    def _batches(self, epoch: int, start: int) -> Iterator[Images]:
        order = epoch_order(len(self.dataset), self.seed, epoch).tolist()
        global_batch, first = self.batch_size * self.world_size, self.rank * self.batch_size
        keys = (  # lazily: (dataset index, augmentation seed) of each image of this rank's batches
            [
                (order[p], mix_seed(self.seed, SAMPLE_AUGMENT, epoch, p))
                for p in range(j * global_batch + first, j * global_batch + first + self.batch_size)
            ]
            for j in range(start, len(self))
        )
        loader = _loader(self.dataset, self.num_workers, batch_sampler=keys, collate_fn=collate)
        for j, batch in enumerate(loader, start=start):
            yield _checked(batch, self.skip_log, f"epoch {epoch} batch {j}")


class ShardTrainStream(TrainStream):
    """WebDataset shards streamed by the workers (see webdataset.py for how streams and batches are formed)."""

    def __init__(self, shards: list[str], num_samples: int, make_stream: Callable, num_workers: int, **kwargs):
        super().__init__(**kwargs)
        self.shards, self.num_samples, self.make_stream, self.num_workers = (
            shards,
            num_samples,
            make_stream,
            num_workers,
        )

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.batch_size, self.world_size)

    def _batches(self, epoch: int, start: int) -> Iterator[Images]:
        stream = self.make_stream(epoch=epoch, start=start, num_batches=len(self))
        loader = _loader(stream, self.num_workers, batch_size=None, collate_fn=_as_is)
        for j, batch in enumerate(loader, start=start):
            yield _checked(batch, self.skip_log, f"epoch {epoch} batch {j}")


def _as_is(batch: Batch) -> Batch:
    return batch


class EvalLoader:
    """Iterable of (images, targets) over one rank's share of an evaluation set: ranks are disjoint and together see
    every image once (none repeated to even them out). Carries the class names the targets index."""

    def __init__(
        self,
        make_batches: Callable[[], Iterable[Batch]],
        *,
        num_samples: int | None,
        class_names: list[str],
        skip_log: SkipLog,
    ):
        self.make_batches, self.num_samples = make_batches, num_samples
        self.class_names, self.skip_log = class_names, skip_log

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __iter__(self) -> Iterator[Images]:
        seen = 0
        for batch in self.make_batches():
            self.skip_log.record(batch.skipped)
            seen += len(batch.skipped)
            if batch.images is not None:  # a batch of only unreadable images has nothing to evaluate
                seen += len(batch.images)
                yield batch.images, batch.targets
        self.skip_log.check(self.skip_log.size or seen)

    def skipped(self) -> list[str]:
        return self.skip_log.ids()


@dataclass
class Loaders:
    train: TrainStream
    val: EvalLoader
    num_classes: int
    class_names: list[str]
    mix: Callable | None  # (images, int targets, generator) -> (images, soft targets (B, num_classes))

    def skipped(self) -> list[str]:
        """Unreadable images skipped so far, by every loader."""
        return self.train.skipped() + self.val.skipped()


def _check_run(in_chans: int, batch_size: int, eval_batch_size: int, rank: int, world_size: int) -> None:
    for name, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grey) or 3 (RGB) for image data, got {in_chans!r}")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank!r}, world_size={world_size!r}")


def _require_root(cfg: DataConfig) -> str:
    if cfg.root is None:
        raise ValueError(f"data.root is required for data.kind={cfg.kind}: the dataset folder")
    return cfg.root


def _source(cfg: DataConfig, train: bool, in_chans: int, class_names: list[str] | None = None):
    """The in-memory or file dataset of one split (not for webdataset)."""
    if cfg.kind == "demo":
        return load_demo(train)
    if cfg.kind in ("cifar10", "cifar100"):
        images, targets, names = read_cifar(_require_root(cfg), cfg.kind, train)
        return TensorImages(images, targets, names, f"{cfg.kind}/{'train' if train else 'test'}")
    root = _require_root(cfg)
    if class_names is None and not train and os.path.isdir(os.path.join(root, cfg.train_split)):
        class_names = class_folders(os.path.join(root, cfg.train_split))  # the order the model's head follows
    field, split = ("train_split", cfg.train_split) if train else ("val_split", cfg.val_split)
    return scan_image_folder(root, split, field, class_names, in_chans)


def _shards(cfg: DataConfig, field: str) -> list[str]:
    pattern = getattr(cfg, field)
    if pattern is None:
        raise ValueError(
            f"data.{field} is required for data.kind=webdataset: a shard pattern such as 'x-{{000..009}}.tar'"
        )
    return shard_paths(pattern, field)


def _shard_facts(cfg: DataConfig) -> tuple[list[str], int, int]:
    """Train shards, sample count and class count (read from the shards unless the config gives them)."""
    shards = _shards(cfg, "train_shards")
    num_samples, num_classes = cfg.train_samples, cfg.num_classes
    if num_samples is None or num_classes is None:
        counted_samples, counted_classes = scan_shards(shards)
        num_samples, num_classes = num_samples or counted_samples, num_classes or counted_classes
    if num_samples == 0 or num_classes == 0:
        raise ValueError(f"data.train_shards={cfg.train_shards!r}: no samples with an image and a .cls label")
    return shards, num_samples, num_classes


def build_loaders(
    cfg: DataConfig,
    *,
    img_size: int | tuple[int, int],
    in_chans: int,
    preprocessing: Preprocessing,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
) -> Loaders:
    """Train stream, validation loader and MixUp/CutMix for one rank; batch sizes are per rank. Every path, split
    and size is checked here, before any training work. In-memory datasets (demo, CIFAR) without per-image
    augmentation are held and augmented on `device` (default CPU), where whole-batch crops cost little next to the
    model; other batches come on the CPU."""
    _check_run(in_chans, batch_size, eval_batch_size, rank, world_size)
    common = dict(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    global_batch = batch_size * world_size
    share = f" (the share of rank {rank})" if world_size > 1 else ""  # the threshold applies to what a rank reads
    if cfg.kind == "webdataset":
        shards, num_samples, num_classes = _shard_facts(cfg)
        streams = world_size * max(1, cfg.num_workers)
        if len(shards) < streams:
            raise ValueError(
                f"data.train_shards: {len(shards)} shards cannot feed {streams} streams (world_size {world_size} x "
                f"num_workers {cfg.num_workers}); use more shards or fewer workers"
            )
        class_names = [str(i) for i in range(num_classes)]
        make_stream = _shard_train_factory(cfg, shards, img_size, in_chans, preprocessing, num_classes, common)
        log = SkipLog(f"train shards {cfg.train_shards}{share}", num_samples // world_size, cfg.max_bad_fraction)
        train = ShardTrainStream(shards, num_samples, make_stream, cfg.num_workers, skip_log=log, **common)
    else:
        source = _source(cfg, True, in_chans)
        num_samples, class_names = len(source), source.class_names
        where = f" ({os.path.join(cfg.root, cfg.train_split)})" if cfg.kind == "imagefolder" else ""
        log = SkipLog(f"the {cfg.kind} train split{where}{share}", num_samples // world_size, cfg.max_bad_fraction)
        if isinstance(source, TensorImages) and not cfg.per_sample_augmentation:
            augment = BatchAugment(
                preprocessing,
                tuple(source.images.shape[-2:]),
                img_size,
                in_chans,
                inception_crop=cfg.inception_crop,
                crop_scale=cfg.crop_scale,
                shift_pixels=cfg.shift_pixels,
                hflip=cfg.hflip,
            )
            permutation = _permutation(cfg, img_size)
            train = TensorTrainStream(source.to(device), augment, permutation, skip_log=log, **common)
        else:
            dataset = SampleDataset(source, _train_transform(cfg, img_size, in_chans, preprocessing))
            train = SampleTrainStream(dataset, cfg.num_workers, skip_log=log, **common)
    if num_samples < global_batch:
        raise ValueError(
            f"the train split has {num_samples} images, fewer than one global batch "
            f"(batch_size {batch_size} x world_size {world_size} = {global_batch})"
        )
    val = build_eval_loader(
        cfg,
        split="val",
        img_size=img_size,
        in_chans=in_chans,
        preprocessing=preprocessing,
        batch_size=eval_batch_size,
        rank=rank,
        world_size=world_size,
        class_names=class_names,
        device=device,
    )
    mix = None
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        mix = MixUpCutMix(len(class_names), cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob)
    return Loaders(train, val, len(class_names), class_names, mix)


def _permutation(cfg: DataConfig, img_size) -> FixedPermutation | None:
    """data.permute's fixed shuffle of the model's input, or None: built from the config alone, so the train and
    eval pipelines (and every rank) get the same one."""
    if cfg.permute is None:
        return None
    try:
        return FixedPermutation(cfg.permute, img_size, cfg.permute_seed, cfg.permute_patch)
    except ValueError as err:
        raise ValueError(f"data.permute={cfg.permute}: {err}") from err


def _then_permuted(transform: Callable, permutation: FixedPermutation | None) -> Callable:
    return transform if permutation is None else T.Compose([transform, permutation])


def _train_transform(cfg: DataConfig, img_size, in_chans: int, preprocessing: Preprocessing):
    transform = build_train_transform(
        preprocessing,
        img_size,
        in_chans=in_chans,
        inception_crop=cfg.inception_crop,
        crop_scale=cfg.crop_scale,
        hflip=cfg.hflip,
        shift_pixels=cfg.shift_pixels,
        randaugment_layers=cfg.randaugment_layers,
        randaugment_magnitude=cfg.randaugment_magnitude,
        random_erasing=cfg.random_erasing,
    )
    return _then_permuted(transform, _permutation(cfg, img_size))


def _shard_train_factory(cfg, shards, img_size, in_chans, preprocessing, num_classes, common) -> Callable:
    transform = _train_transform(cfg, img_size, in_chans, preprocessing)

    def make_stream(epoch: int, start: int, num_batches: int) -> ShardTrainDataset:
        return ShardTrainDataset(
            shards,
            transform=transform,
            in_chans=in_chans,
            num_classes=num_classes,
            num_batches=num_batches,
            shuffle_buffer=cfg.shuffle_buffer,
            epoch=epoch,
            start=start,
            **common,
        )

    return make_stream


def build_eval_loader(
    cfg: DataConfig,
    *,
    split: str = "val",
    img_size: int | tuple[int, int],
    in_chans: int,
    preprocessing: Preprocessing,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    class_names: list[str] | None = None,
    device: str | torch.device | None = None,
) -> EvalLoader:
    """Evaluation batches of split "val" (ImageFolder val_split, CIFAR test, the demo's held-out images, val_shards)
    or "train", preprocessed by cfg.eval_preset. class_names (from the train split) fix the class order where the
    split's own folders would not."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    _check_run(in_chans, batch_size, batch_size, rank, world_size)
    transform = _then_permuted(
        build_eval_transform(preprocessing, img_size, cfg.eval_preset, cfg.crop_pct, in_chans),
        _permutation(cfg, img_size),
    )
    if cfg.kind == "webdataset":
        field = "train_shards" if split == "train" else "val_shards"
        shards = _shards(cfg, field)
        if class_names is None:  # the config's count, else the train shards', else the evaluated shards'
            counted = cfg.num_classes or (_shard_facts(cfg)[2] if cfg.train_shards else scan_shards(shards)[1])
            class_names = [str(i) for i in range(counted)]
        stream = ShardEvalDataset(
            shards,
            transform=transform,
            in_chans=in_chans,
            num_classes=len(class_names),
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
        )
        log = SkipLog(f"{field} {getattr(cfg, field)}", None, cfg.max_bad_fraction)

        def shard_batches() -> Iterable[Batch]:
            return _loader(stream, cfg.num_workers, batch_size=None, collate_fn=_as_is)

        return EvalLoader(shard_batches, num_samples=None, class_names=class_names, skip_log=log)
    source = _source(cfg, split == "train", in_chans, class_names)
    indices = eval_indices(len(source), rank, world_size)
    log = SkipLog(f"the {cfg.kind} {split} split", len(indices), cfg.max_bad_fraction)
    if isinstance(source, TensorImages):
        source = source.to(device)

        def tensor_batches() -> Iterator[Batch]:
            for first in range(0, len(indices), batch_size):
                chosen = torch.as_tensor(indices[first : first + batch_size])
                yield Batch(transform(source.images[chosen]), source.targets[chosen], [])

        return EvalLoader(tensor_batches, num_samples=len(indices), class_names=source.class_names, skip_log=log)
    dataset = SampleDataset(source, transform)
    keys = [[(i, None) for i in indices[first : first + batch_size]] for first in range(0, len(indices), batch_size)]

    def file_batches() -> Iterable[Batch]:
        return _loader(dataset, cfg.num_workers, batch_sampler=keys, collate_fn=collate)

    return EvalLoader(file_batches, num_samples=len(indices), class_names=source.class_names, skip_log=log)
