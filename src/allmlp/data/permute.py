"""Fixed pixel permutations of the input: the MLP-Mixer paper's invariance experiment (Section 3.4, Figure 4).

The same permutation is applied to every image, after all augmentation and normalisation, in training and in
evaluation alike, so the network sees a fixed re-ordering of its input grid:
- "patches": the patch grid is shuffled by one permutation and the pixels inside each patch by another, the same
  one in every patch. For a Mixer with the same patch size this is exactly a re-ordering of its tokens and of
  its stem's inputs, which it can undo by re-ordering its weights (it has no position embeddings);
- "pixels": all pixel positions of the image are shuffled by one permutation.
Channels are never mixed: a pixel keeps its colour. The permutation depends only on (kind, image size, patch size,
seed), never on the run's seed, so runs with different training seeds see the same re-ordered images.
"""

from __future__ import annotations

import torch

from ..models.layers import to_pair

PERMUTE_KINDS = ("patches", "pixels")


class FixedPermutation:
    """images (..., C, H, W) -> the same images with their H x W positions re-ordered by one fixed permutation.

    `index[i]` is the flat (row-major) source position of output position i. For "patches", output patch g
    (row-major on the patch grid) is source patch `patch_order[g]`, and offset k inside it (row-major in the
    patch) is offset `pixel_order[k]` of that source patch; both are None for "pixels".
    """

    def __init__(self, kind: str, img_size: int | tuple[int, int], seed: int = 0, patch_size: int | None = None):
        if kind not in PERMUTE_KINDS:
            raise ValueError(f"permutation kind must be one of {', '.join(PERMUTE_KINDS)}, got {kind!r}")
        self.kind, self.size, self.seed, self.patch_size = kind, to_pair(img_size, "img_size"), seed, patch_size
        height, width = self.size
        generator = torch.Generator().manual_seed(seed)
        self.patch_order: torch.Tensor | None = None
        self.pixel_order: torch.Tensor | None = None
        if kind == "pixels":
            self.index = torch.randperm(height * width, generator=generator)
            return
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"a patch permutation needs the patch size (an integer >= 1), got {patch_size!r}")
        if height % patch_size or width % patch_size:
            raise ValueError(f"patch size {patch_size} must divide the image size {height} x {width}")
        grid_w = width // patch_size
        self.patch_order = torch.randperm((height // patch_size) * grid_w, generator=generator)
        self.pixel_order = torch.randperm(patch_size * patch_size, generator=generator)
        source_patch, source_pixel = self.patch_order[:, None], self.pixel_order[None, :]
        rows = (source_patch // grid_w) * patch_size + source_pixel // patch_size
        cols = (source_patch % grid_w) * patch_size + source_pixel % patch_size
        flat = rows * width + cols  # (patches, pixels per patch), in output order
        grid_h = height // patch_size
        # lay the (patch, offset) pairs out on the output image, row-major
        self.index = (
            flat.reshape(grid_h, grid_w, patch_size, patch_size).permute(0, 2, 1, 3).reshape(height * width).clone()
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim < 3 or tuple(images.shape[-2:]) != self.size:
            raise ValueError(
                f"the fixed {self.kind} permutation is for images (..., C, {self.size[0]}, {self.size[1]}), "
                f"got {tuple(images.shape)}"
            )
        flat = images.flatten(-2)
        return flat[..., self.index.to(images.device)].reshape(images.shape)

    def __repr__(self) -> str:
        patch = f", patch_size={self.patch_size}" if self.kind == "patches" else ""
        return f"FixedPermutation({self.kind!r}, img_size={self.size}, seed={self.seed}{patch})"
