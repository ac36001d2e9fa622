"""The paper's metrics, per modality (digits trio) or per column (tables).

Digits trio, for each modality m (test split; classifiers and probes are fitted on the train split):

* ``coherence`` — cross-modal coherence: generate m from each *other* modality alone, and score the digit a
  classifier trained on real m-data reads in it (mean over the source modalities).
* ``latent`` — latent classification: a linear (ridge) probe on the posterior mean ``E[z | xₘ]``.
* ``recon`` — self-reconstruction error of m from all modalities: mean squared pixel error for images,
  character error rate for text.

Tables: per-column imputation error on the hidden entries — RMSE divided by the column's range (numeric),
error rate (categorical).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import RidgeClassifier

from .data import Split, Table


def _probe(X: np.ndarray, y: np.ndarray) -> RidgeClassifier:
    # a closed-form linear classifier: logistic regression reads the same digits (95% vs 95% on real images)
    # but costs ~10 s per fit on the 256-pixel view, longer than training a model
    return RidgeClassifier(alpha=1.0).fit(X, y)


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.reshape(len(t), -1).numpy()


_JUDGES: dict[tuple, dict[str, RidgeClassifier]] = {}


def _classifiers(key: tuple, train: Split) -> dict[str, RidgeClassifier]:
    # cached by the data set's arguments: every method and model of a seed reuses the same judges
    if key not in _JUDGES:
        _JUDGES[key] = {m: _probe(_flat(v), train.y.numpy()) for m, v in train.x.items()}
    return _JUDGES[key]


def multimodal(model, train: Split, test: Split, key: tuple) -> dict[str, dict[str, float]]:
    """``{metric: {modality: value}}`` for a trained multimodal VAE (see the module docstring)."""
    model.eval()
    clf = _classifiers(key, train)
    names = model.names
    y = test.y.numpy()
    out: dict[str, dict[str, float]] = {"coherence": {}, "source": {}, "latent": {}, "recon": {}}
    gen = {n: model.generate({n: test.x[n]}) for n in names}  # gen[source][target]
    acc = {}  # (source, target) → accuracy of the target's judge on what the source generated
    for n in names:
        for m in names:
            if n != m:
                xm = gen[n][m]
                if m == "text":  # read the generated word as its most likely characters
                    xm = torch.nn.functional.one_hot(xm.argmax(-1), xm.shape[-1]).float()
                acc[n, m] = float((clf[m].predict(_flat(xm)) == y).mean())
    for m in names:
        out["coherence"][m] = float(np.mean([a for (n, t), a in acc.items() if t == m]))
        out["source"][m] = float(np.mean([a for (n, t), a in acc.items() if n == m]))
        z_tr = model.embed({m: train.x[m]}).numpy()
        z_te = model.embed({m: test.x[m]}).numpy()
        out["latent"][m] = float((_probe(z_tr, train.y.numpy()).predict(z_te) == y).mean())
    rec = model.generate(test.x)
    for m in names:
        if m == "text":
            out["recon"][m] = float((rec[m].argmax(-1) != test.x[m].argmax(-1)).float().mean())
        else:
            out["recon"][m] = float((rec[m] - test.x[m]).pow(2).mean())
    model.train()
    return out


def imputation(model, t: Table) -> dict[str, dict[str, float]]:
    """``{"error": {column: value}}``: imputation error of the hidden entries (see the module docstring)."""
    model.eval()
    pred = model.impute(t.x, t.observed)
    model.train()
    hidden = ~t.observed
    err = {}
    for j, name in enumerate(t.names):
        h = hidden[:, j]
        truth, guess = t.x[h, j], pred[h, j]
        if t.kinds[j] == "cat":
            err[name] = float((truth != guess).float().mean())
        else:
            span = float(t.x[:, j].max() - t.x[:, j].min())
            err[name] = float((truth - guess).pow(2).mean().sqrt()) / span
    return {"error": err}
