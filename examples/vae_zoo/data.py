"""Embedded data sets for the VAE zoo (nothing is downloaded: sklearn ships them).

* :func:`digits_trio` — sklearn's 8×8 digits as three modalities of the same digit, a miniature of the
  paper's MNIST-SVHN-Text: ``image`` (the 64 pixels in [0, 1]), ``text`` (the digit's English word as a
  one-hot character sequence), and ``hard`` (a *different* image of the same class, mirrored, upsampled and
  noised — the "SVHN" of the trio: more dimensions, less signal per dimension).
* :func:`tabular` — sklearn's wine or breast-cancer table with its label as a categorical column, each
  column given the likelihood its values call for (Gaussian, log-normal, Poisson, categorical), and a fixed
  random missingness mask for the imputation metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from torch import Tensor

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ALPHABET = sorted(set("".join(WORDS))) + ["_"]  # "_" pads the words to one length
WORD_LEN = max(map(len, WORDS))


def words_onehot(labels: np.ndarray) -> np.ndarray:
    """The words of ``labels`` as one-hot character sequences ``[n, WORD_LEN, len(ALPHABET)]``."""
    out = np.zeros((len(labels), WORD_LEN, len(ALPHABET)), dtype=np.float32)
    for i, y in enumerate(labels):
        for t, ch in enumerate(WORDS[y].ljust(WORD_LEN, "_")):
            out[i, t, ALPHABET.index(ch)] = 1.0
    return out


@dataclass
class Split:
    """One split: modality name → tensor ``[n, ...]``, and the labels ``[n]`` (metrics only, never trained on)."""

    x: dict[str, Tensor]
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


def digits_trio(seed: int = 0, hard_side: int = 16, noise: float = 0.3, test_frac: float = 0.25) -> tuple[Split, Split]:
    """Train and test splits of the digits trio.

    ``hard_side`` sets the dimensionality of the hard view (``hard_side²`` pixels; the 8×8 image is upsampled
    by pixel repetition), which is the knob of the paper's dimensionality imbalance.  The hard view of sample i
    is another sample of the same class, drawn with ``seed``, so it shares only the class with the image.
    """
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)
    y = d.target
    rng = np.random.default_rng(seed)
    partner = np.empty_like(y)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        partner[idx] = rng.permutation(idx)
    hard = X[partner][:, :, ::-1]  # mirrored
    rep = hard_side // 8
    hard = hard.repeat(rep, axis=1).repeat(rep, axis=2)
    hard = np.clip(hard + noise * rng.standard_normal(hard.shape), 0.0, 1.0).astype(np.float32)
    mods = {"image": X.reshape(len(y), 64), "text": words_onehot(y), "hard": hard.reshape(len(y), -1)}
    order = rng.permutation(len(y))
    n_test = int(len(y) * test_frac)

    def take(ix: np.ndarray) -> Split:
        return Split(
            {k: torch.from_numpy(np.ascontiguousarray(v[ix])) for k, v in mods.items()}, torch.from_numpy(y[ix])
        )

    return take(order[n_test:]), take(order[:n_test])


@dataclass
class Table:
    """A heterogeneous table: ``x [n, C]`` (categorical columns hold class indices), per-column ``kinds``
    (``"real"``, ``"pos"``, ``"count"``, ``"cat"``), ``n_classes`` (for ``"cat"``, else 0), the column
    ``names`` and ``observed [n, C]`` (False where an entry is hidden from the model and kept for imputation,
    as in HI-VAE's protocol: train on every row's observed entries, score the hidden ones)."""

    x: Tensor
    kinds: list[str]
    n_classes: list[int]
    names: list[str]
    observed: Tensor


def _kind(col: np.ndarray) -> str:
    if np.all(col == np.round(col)) and col.min() >= 0:
        return "count"
    skew = ((col - col.mean()) ** 3).mean() / col.std() ** 3
    return "pos" if col.min() > 0 and skew > 0.5 else "real"


def tabular(name: str = "wine", seed: int = 0, missing: float = 0.2) -> Table:
    """The ``wine`` (178 × 14) or ``breast_cancer`` (569 × 31) table; the label is the last, categorical column.

    Column kinds follow the values: non-negative integers are counts (Poisson: wine's magnesium and proline),
    positive right-skewed columns are log-normal, the rest Gaussian.  A fraction ``missing`` of the entries of
    every row is hidden (uniformly at random, fixed by ``seed``): the model never sees them, and the
    imputation metric scores them.
    """
    loader = {"wine": load_wine, "breast_cancer": load_breast_cancer}[name]
    d = loader()
    X = d.data.astype(np.float64)
    kinds = [_kind(X[:, j]) for j in range(X.shape[1])] + ["cat"]
    n_classes = [0] * X.shape[1] + [len(d.target_names)]
    names = [str(n) for n in d.feature_names] + ["label"]
    x = np.concatenate([X, d.target[:, None].astype(np.float64)], axis=1)
    rng = np.random.default_rng(seed)
    observed = rng.random(x.shape) >= missing
    return Table(torch.tensor(x, dtype=torch.float32), kinds, n_classes, names, torch.from_numpy(observed))
