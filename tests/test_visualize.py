"""allmlp visualize: token-mixing units on the patch grid, stem filters, training curves; files and sizes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import allmlp
from allmlp.cli import main
from allmlp.tools import visualize as vis


def tiny_mixer(img_size=16, tokens_mlp_dim=8, hidden_dim=16, num_blocks=2) -> allmlp.MlpMixer:
    torch.manual_seed(0)
    return allmlp.MlpMixer(
        img_size=img_size,
        patch_size=4,
        num_classes=3,
        hidden_dim=hidden_dim,
        num_blocks=num_blocks,
        tokens_mlp_dim=tokens_mlp_dim,
        channels_mlp_dim=16,
    )


def grid_size(count: int, tile_h: int, tile_w: int) -> tuple[int, int]:
    """(width, height) of `count` tiles in ceil(sqrt) columns with 1-pixel gaps around them."""
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    return columns * (tile_w + 1) + 1, rows * (tile_h + 1) + 1


def test_units_are_the_rows_of_w1_on_the_patch_grid():
    model = tiny_mixer(img_size=(16, 24))  # 4 x 6 patch grid
    units = vis.token_mixing_units(model, 1)
    w1 = model.blocks[1].mlp_tokens.fc1.weight.detach()
    assert units.shape == (8, 4, 6)
    rows = {tuple(row.tolist()) for row in w1}
    assert {tuple(unit.flatten().tolist()) for unit in units} == rows
    with pytest.raises(ValueError, match=r"block must be in \[0, 2\)"):
        vis.token_mixing_units(model, 2)


def test_units_sorted_from_smooth_to_oscillating():
    model = tiny_mixer(tokens_mlp_dim=3)  # 4 x 4 grid
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    checkerboard = (-1.0) ** (rows + cols)
    ramp = rows + 0.1 * cols
    stripes = torch.cos(torch.pi * cols / 2)
    with torch.no_grad():
        model.blocks[0].mlp_tokens.fc1.weight.copy_(torch.stack([checkerboard, ramp, stripes]).reshape(3, 16))
    units = vis.token_mixing_units(model, 0)
    assert torch.equal(units[0], ramp) and torch.equal(units[1], stripes) and torch.equal(units[2], checkerboard)


def test_tile_layout_and_colours():
    images = np.zeros((5, 2, 3, 3))
    images[0, 0, 0] = 1.0
    picture = vis.tile(images, scale=2)
    assert picture.size == grid_size(5, 4, 6)
    pixels = np.asarray(picture)
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # gap
    assert tuple(pixels[1, 1]) == (255, 255, 255) and tuple(pixels[2, 2]) == (255, 255, 255)  # scaled 2x
    assert tuple(pixels[1, 3]) == (0, 0, 0)
    colours = vis.diverging_colors(np.array([-1.0, 0.0, 1.0]))
    np.testing.assert_allclose(colours, [[0, 0, 1], [1, 1, 1], [1, 0, 0]])


def test_visualize_writes_pictures_of_the_right_size(tmp_path):
    model = tiny_mixer(img_size=(16, 24))
    written = vis.visualize(model, tmp_path / "pics", blocks=[0, 1])
    assert [p.name for p in written] == ["token_mixing_block0.png", "token_mixing_block1.png", "stem_filters.png"]
    scale = 28 // 6  # 4 x 6 grid, enlarged to about 28 pixels
    with Image.open(written[0]) as image:
        assert image.size == grid_size(8, 4 * scale, 6 * scale) and image.mode == "RGB"
        pixels = np.asarray(image)
    # every unit is scaled by its own peak: the strongest weight of a positive-peak unit is pure red
    peak_colours = {tuple(p) for p in pixels.reshape(-1, 3)}
    assert (255, 0, 0) in peak_colours or (0, 0, 255) in peak_colours
    with Image.open(written[2]) as image:
        assert image.size == grid_size(16, 28, 28)  # 16 filters of 4 x 4, enlarged 7x


def test_training_curves_from_a_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 2.0 / (s + 1), "lr": 1e-3 * min(1, s / 5)} for s in range(0, 20, 2)]
    lines += [{"step": s, "eval_top1": 10.0 * s / 4} for s in (5, 10, 15)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    written = vis.visualize(tiny_mixer(), tmp_path / "pics", run_dir=run)
    assert written[-1].name == "training_curves.png"
    with Image.open(written[-1]) as image:
        assert image.size == (3 * 450, 340)  # three panels of 4.5 x 3.4 inches at 100 dpi

    # a run killed while writing leaves a last line cut short: it is skipped, as the trainer does
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + '\n{"step": 2, "loss": ')
    assert vis.read_run_metrics(run) == [{"step": 1, "loss": 1.0}]
    with Image.open(vis.draw_curves(vis.read_run_metrics(run), tmp_path / "one.png")) as image:
        assert image.size == (450, 340)
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        vis.read_run_metrics(tmp_path)
    with pytest.raises(ValueError, match="no step with any of"):
        vis.draw_curves([{"step": 1, "images_per_s": 3.0}], tmp_path / "none.png")


def test_visualize_command_with_a_timm_style_checkpoint(tmp_path, capsys):
    model = tiny_mixer()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "checkpoint.pth")
    status = main(["visualize", "--weights", str(tmp_path / "checkpoint.pth"), "--out", str(tmp_path / "pics")])
    assert status == 0
    assert "token_mixing_block0.png" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["stem_filters.png", "token_mixing_block0.png"]
    with Image.open(tmp_path / "pics" / "token_mixing_block0.png") as image:
        assert image.size == grid_size(8, 28, 28)
    assert main(["visualize", "--weights", str(tmp_path / "nothing.pth"), "--out", str(tmp_path / "pics")]) == 2


def test_stem_of_a_grey_model_and_non_mixer_models(tmp_path):
    grey = allmlp.MlpMixer(img_size=8, patch_size=4, in_chans=1, num_classes=2, hidden_dim=4, num_blocks=1,
                           tokens_mlp_dim=2, channels_mlp_dim=4)  # fmt: skip
    with Image.open(vis.visualize(grey, tmp_path)[-1]) as image:
        pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2), torch.nn.Flatten())
    other.config = {}
    assert [p.name for p in vis.visualize(other, tmp_path / "other")] == ["stem_filters.png"]
    with pytest.raises(ValueError, match="token-mixing units exist in MlpMixer models"):
        vis.visualize(other, tmp_path / "other", blocks=[0])
    with pytest.raises(ValueError, match="no convolutional stem"):
        vis.visualize(torch.nn.Linear(2, 2), tmp_path / "other")


def test_blocks_are_checked_before_anything_is_written(tmp_path, capsys):
    weights = allmlp.save_weights(tiny_mixer(num_blocks=4), tmp_path / "w.safetensors")
    out = tmp_path / "pictures"
    assert main(["visualize", "--weights", weights, "--out", str(out), "--blocks", "0", "5"]) == 2
    assert "--blocks 5: this model has 4 blocks, numbered 0 to 3" in capsys.readouterr().err
    assert not out.exists()
    assert main(["visualize", "--weights", weights, "--out", str(out), "--blocks", "0", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "stem_filters.png",
        "token_mixing_block0.png",
        "token_mixing_block3.png",
    ]
