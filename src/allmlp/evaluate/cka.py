"""Linear centered kernel alignment (CKA) between layers, in the full and the minibatch form.

Kornblith et al. 2019 ("Similarity of neural network representations revisited") compare two representations
X (n x p) and Y (n x q) of the same n inputs through their Gram matrices K = X Xᵀ and L = Y Yᵀ:
    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),
with HSIC(K, L) = tr(K H L H) / (n - 1)² (H = I - 11ᵀ/n centres the features). That value is invariant to
orthogonal transforms and isotropic scaling of either representation, and it needs every input at once.

Nguyen, Raghu and Kornblith 2021 ("Do wide and deep networks learn the same things?", Section 3.1) split the
inputs into minibatches and average the unbiased HSIC estimator of Song et al. 2012 over them:
    HSIC_1(K, L) = [tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) 1ᵀK̃L̃1] / (n(n-3)),
where K̃, L̃ are the Gram matrices with their diagonals set to zero (n >= 4 inputs per batch), and
    CKA_minibatch = Σ_i HSIC_1(K_i, L_i) / sqrt(Σ_i HSIC_1(K_i, K_i) Σ_i HSIC_1(L_i, L_i)).
Because HSIC_1 is unbiased, the average does not depend on the batch size in expectation; memory is bounded by
one batch's Gram matrices. With a single batch holding every input this is the debiased CKA of the full set.

Everything is computed in float64: the unbiased estimator subtracts nearly equal terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_BATCH_UNBIASED = 4  # HSIC_1 divides by n(n-3) and (n-1)(n-2)


def gram(features: torch.Tensor) -> torch.Tensor:
    """K = X Xᵀ (float64) of features (n, ...) flattened per input. Features are centred first, which changes
    neither HSIC estimate (both are invariant to adding a constant vector to every row) but keeps K small."""
    if features.ndim < 2:
        raise ValueError(f"features must be (n, ...) with one row per input, got shape {tuple(features.shape)}")
    x = features.reshape(features.shape[0], -1).to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


class _Terms:
    """What the HSIC estimates need from one Gram matrix, so that all pairs of layers cost a few products."""

    def __init__(self, k: torch.Tensor, unbiased: bool):
        n = k.shape[0]
        if k.ndim != 2 or k.shape[1] != n:
            raise ValueError(f"a Gram matrix must be square (n, n), got shape {tuple(k.shape)}")
        if unbiased:
            k = k.clone()
            k.fill_diagonal_(0.0)
        else:
            k = k - k.mean(dim=0, keepdim=True)  # H K H
            k = k - k.mean(dim=1, keepdim=True)
        self.n, self.flat, self.rows, self.total = n, k.reshape(-1), k.sum(dim=1), k.sum()


def _hsic(a: Sequence[_Terms], b: Sequence[_Terms], unbiased: bool) -> torch.Tensor:
    """HSIC estimates of every pair (a_i, b_j) of one batch: (len(a), len(b))."""
    n = a[0].n
    trace = torch.stack([t.flat for t in a]) @ torch.stack([t.flat for t in b]).T  # tr(K L) for symmetric K, L
    if not unbiased:
        return trace / (n - 1) ** 2
    totals = torch.outer(torch.stack([t.total for t in a]), torch.stack([t.total for t in b]))
    middle = torch.stack([t.rows for t in a]) @ torch.stack([t.rows for t in b]).T  # 1ᵀ K̃ L̃ 1
    return (trace + totals / ((n - 1) * (n - 2)) - 2.0 * middle / (n - 2)) / (n * (n - 3))


class CKAAccumulator:
    """CKA between every layer of model A and every layer of model B, accumulated over batches of inputs.

    `update(grams_a, grams_b)` takes the Gram matrices of one batch (one per layer, the same inputs for both);
    `result()` is the (layers of A, layers of B) CKA matrix. unbiased=True: Nguyen et al.'s minibatch estimator
    (with one batch: the debiased CKA of the full set); unbiased=False: the plain estimator of Kornblith et al.,
    which is exact for a single batch holding every input and biased (towards batch-size-dependent values) for
    minibatches.
    """

    def __init__(self, unbiased: bool = True):
        self.unbiased = unbiased
        self.cross: torch.Tensor | None = None
        self.self_a: torch.Tensor | None = None
        self.self_b: torch.Tensor | None = None
        self.batches = 0

    def update(self, grams_a: Sequence[torch.Tensor], grams_b: Sequence[torch.Tensor]) -> None:
        if not grams_a or not grams_b:
            raise ValueError("update needs at least one Gram matrix per model")
        sizes = {k.shape[0] for k in [*grams_a, *grams_b]}
        if len(sizes) != 1:
            raise ValueError(f"every Gram matrix of a batch must cover the same inputs, got sizes {sorted(sizes)}")
        n = sizes.pop()
        if self.unbiased and n < MIN_BATCH_UNBIASED:
            raise ValueError(f"the unbiased HSIC estimator needs batches of >= {MIN_BATCH_UNBIASED} inputs, got {n}")
        a = [_Terms(k.to(torch.float64), self.unbiased) for k in grams_a]
        b = [_Terms(k.to(torch.float64), self.unbiased) for k in grams_b]
        cross = _hsic(a, b, self.unbiased)
        self_a = torch.stack([_hsic([t], [t], self.unbiased)[0, 0] for t in a])
        self_b = torch.stack([_hsic([t], [t], self.unbiased)[0, 0] for t in b])
        if self.cross is None:
            self.cross, self.self_a, self.self_b = cross, self_a, self_b
        elif cross.shape != self.cross.shape:
            raise ValueError(f"expected {tuple(self.cross.shape)} layers per batch as before, got {tuple(cross.shape)}")
        else:
            self.cross, self.self_a, self.self_b = self.cross + cross, self.self_a + self_a, self.self_b + self_b
        self.batches += 1

    def result(self) -> torch.Tensor:
        """(layers of A, layers of B) CKA; NaN where a layer's representation is constant over the inputs."""
        if self.cross is None:
            raise ValueError("no batches were added")
        return self.cross / torch.sqrt(torch.outer(self.self_a, self.self_b))


def linear_cka(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False) -> float:
    """CKA of two representations (n, ...) of the same n inputs, all at once (unbiased: the debiased form)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have one row per input each, got {x.shape[0]} and {y.shape[0]} rows")
    accumulator = CKAAccumulator(unbiased)
    accumulator.update([gram(x)], [gram(y)])
    return float(accumulator.result()[0, 0])


def minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Nguyen et al.'s minibatch CKA of x and y (n, ...), over consecutive batches of about batch_size rows."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have one row per input each, got {x.shape[0]} and {y.shape[0]} rows")
    accumulator = CKAAccumulator(unbiased=True)
    for rows in batch_slices(x.shape[0], batch_size):
        accumulator.update([gram(x[rows])], [gram(y[rows])])
    return float(accumulator.result()[0, 0])


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """n inputs in ceil(n / batch_size) consecutive batches whose sizes differ by at most one."""
    if batch_size < 1 or n < 1:
        raise ValueError(f"need n >= 1 inputs and batch_size >= 1, got n={n}, batch_size={batch_size}")
    count = -(-n // batch_size)
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(count)]
