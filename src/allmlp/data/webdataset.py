"""WebDataset tar shards read as streams with the standard library: for data that does not fit a local disk.

A shard is a plain (optionally gzipped) tar whose consecutive members sharing a key form one sample: the key is the
member path up to the first dot of its file name, the rest is the field name, e.g. `n01440764_10026.jpg` and
`n01440764_10026.cls` (the class index as decimal text). Shards are split over ranks and loader workers ("streams";
each stream reads whole shards, so a run needs at least world_size * max(1, num_workers) train shards), every stream
shuffles through a buffer, and an epoch is a fixed number of batches: a stream that runs out of samples starts its
shards again in a new order (WebDataset's resampling), so every rank takes the same number of steps.

Determinism: a stream's samples, their order and their augmentations are a pure function of (seed, epoch, rank,
worker, position), and DataLoader hands out worker batches round-robin, so a given configuration always yields the
same batches and `batches(epoch, start)` skips exactly `start` of them (reading, not decoding, the skipped samples).
Changing num_workers or world_size changes which stream reads which shard, hence the batches.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator

import torch

from .datasets import UNREADABLE_ERRORS, Unreadable, collate, read_image
from .sampling import SAMPLE_AUGMENT, SHARDS, SHUFFLE, generator, mix_seed

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
LABEL_FIELD = "cls"
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """ "a-{000..002}.tar" -> a-000.tar, a-001.tar, a-002.tar; "{x,y}" -> x, y; several groups multiply."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        if int(last) < int(first):
            raise ValueError(f"shard pattern {pattern!r}: range {body} runs backwards")
        width = len(first) if first.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [path for choice in choices for path in expand_braces(head + choice + tail)]


def shard_paths(pattern: str, field: str) -> list[str]:
    """Expanded shard list; every file must exist (checked once, before any work)."""
    paths = expand_braces(pattern)
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"data.{field}={pattern!r}: {len(missing)} of {len(paths)} shard files do not exist: {shown}")
    return paths


def _split_name(name: str) -> tuple[str, str]:
    directory, base = os.path.split(name)
    key, _, field = base.partition(".")
    return os.path.join(directory, key), field.lower()


def read_shard(path: str) -> Iterator[tuple[str, dict[str, bytes]] | Unreadable]:
    """Samples (id, {field: bytes}) of one shard in file order, read as a stream; a damaged tar ends with an
    Unreadable entry instead of an exception, so one bad shard does not stop a run."""
    key, fields = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, field = _split_name(member.name)
                if member_key != key and fields:
                    yield f"{path}:{key}", fields
                    fields = {}
                key = member_key
                fields[field] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        yield Unreadable(f"{path} (damaged after sample {key})", f"{type(error).__name__}: {error}")
        return
    if fields:
        yield f"{path}:{key}", fields


def decode(
    sample_id: str, fields: dict[str, bytes], transform: Callable, in_chans: int, num_classes: int, seed: int | None
) -> tuple[torch.Tensor, int] | Unreadable:
    """One sample's image through the transform (seeded as in SampleDataset) and its class index."""
    image_field = next((f for f in IMAGE_FIELDS if f in fields), None)
    if image_field is None or LABEL_FIELD not in fields:
        return Unreadable(sample_id, f"needs an image ({'/'.join(IMAGE_FIELDS)}) and a .{LABEL_FIELD}: {list(fields)}")
    try:
        label = int(fields[LABEL_FIELD].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return Unreadable(sample_id, f".{LABEL_FIELD} is not an integer: {fields[LABEL_FIELD][:20]!r}")
    if not 0 <= label < num_classes:
        return Unreadable(sample_id, f"class {label} outside [0, {num_classes})")
    try:
        image = read_image(io.BytesIO(fields[image_field]), in_chans)
    except UNREADABLE_ERRORS as error:
        return Unreadable(sample_id, f"{type(error).__name__}: {error}")
    if seed is None:
        return transform(image), label
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image), label


def scan_shards(paths: list[str]) -> tuple[int, int]:
    """(number of samples, largest class index + 1) over the shards, reading tar headers and .cls members only."""
    count, num_classes = 0, 0
    for path in paths:
        keys = set()
        try:
            with tarfile.open(path, mode="r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, field = _split_name(member.name)
                    keys.add(key)
                    if field == LABEL_FIELD:
                        try:
                            num_classes = max(num_classes, int(tar.extractfile(member).read().decode("ascii")) + 1)
                        except (UnicodeDecodeError, ValueError):
                            continue  # this sample is skipped as unreadable when read
        except (tarfile.TarError, OSError, EOFError):
            pass  # a damaged shard counts up to the damage; reading it reports the rest as skipped
        count += len(keys)
    return count, num_classes


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ShardTrainDataset(torch.utils.data.IterableDataset):
    """Batches of one epoch for one rank, starting at batch `start` (see the module docstring)."""

    def __init__(
        self,
        shards: list[str],
        *,
        transform: Callable,
        in_chans: int,
        num_classes: int,
        batch_size: int,
        num_batches: int,
        shuffle_buffer: int,
        seed: int,
        epoch: int,
        start: int,
        rank: int,
        world_size: int,
    ):
        super().__init__()
        self.shards, self.transform, self.in_chans, self.num_classes = shards, transform, in_chans, num_classes
        self.batch_size, self.num_batches, self.shuffle_buffer = batch_size, num_batches, shuffle_buffer
        self.seed, self.epoch, self.start, self.rank, self.world_size = seed, epoch, start, rank, world_size

    def __iter__(self) -> Iterator:
        loader_worker, num_workers = _worker()
        # DataLoader asks workers in turn from worker 0, so the worker that makes batch `start` comes first
        worker = (loader_worker + self.start) % num_workers
        stream = self.rank * num_workers + worker
        streams = self.world_size * num_workers
        order = torch.randperm(len(self.shards), generator=generator(self.seed, SHARDS, self.epoch)).tolist()
        mine = [self.shards[i] for i in order[stream::streams]]
        # global batch j of this rank comes from worker j % num_workers
        quota = self.num_batches // num_workers + (worker < self.num_batches % num_workers)
        done = max(0, -(-(self.start - worker) // num_workers))
        samples = self._shuffled(mine, stream)
        for index in range(quota):
            raw = list(itertools.islice(samples, self.batch_size))
            if index < done:
                continue
            decoded = []
            for position, item in enumerate(raw, start=index * self.batch_size):
                if isinstance(item, Unreadable):
                    decoded.append(item)
                else:
                    seed = mix_seed(self.seed, SAMPLE_AUGMENT, self.epoch, stream, position)
                    decoded.append(decode(*item, self.transform, self.in_chans, self.num_classes, seed))
            yield collate(decoded)

    def _shuffled(self, shards: list[str], stream: int) -> Iterator:
        """Endless sample stream of these shards (a new shard order on each pass) through a shuffle buffer."""
        rng = random.Random(mix_seed(self.seed, SHUFFLE, self.epoch, stream))
        buffer = []
        for repeat in itertools.count():
            if repeat:
                reorder = torch.randperm(
                    len(shards), generator=generator(self.seed, SHARDS, self.epoch, stream, repeat)
                )
                shards = [shards[i] for i in reorder.tolist()]
            produced = 0
            for sample in itertools.chain.from_iterable(map(read_shard, shards)):
                produced += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                slot = rng.randrange(len(buffer))
                yield buffer[slot]
                buffer[slot] = sample
            if not produced:
                raise ValueError(f"webdataset shards {shards} hold no samples")


class ShardEvalDataset(torch.utils.data.IterableDataset):
    """Every sample of the shards once: shard i goes to stream i % (world_size * workers); batches in file order."""

    def __init__(
        self,
        shards: list[str],
        *,
        transform: Callable,
        in_chans: int,
        num_classes: int,
        batch_size: int,
        rank: int,
        world_size: int,
    ):
        super().__init__()
        self.shards, self.transform, self.in_chans, self.num_classes = shards, transform, in_chans, num_classes
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator:
        worker, num_workers = _worker()
        stream = self.rank * num_workers + worker
        samples = itertools.chain.from_iterable(map(read_shard, self.shards[stream :: self.world_size * num_workers]))
        while raw := list(itertools.islice(samples, self.batch_size)):
            yield collate([self._decode(item) for item in raw])

    def _decode(self, item) -> tuple[torch.Tensor, int] | Unreadable:
        if isinstance(item, Unreadable):
            return item
        return decode(*item, self.transform, self.in_chans, self.num_classes, None)
