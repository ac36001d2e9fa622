"""One step of the zoo's HI-VAE under both ``nested=`` conventions: how far apart the encoder-of-``s`` gradients
are, and what each costs (examples/RESULTS.md, "Nested blocks").

    python examples/nested_check.py            # under a minute on one CPU core

Per solver: ``|g_direct − g_resolved| / |g_resolved|`` for the encoder of ``s`` at initialisation (seed 0, the
first batch of 32, the same latent samples for both), and the time of one ``impartial.backward`` under
``"direct"`` over ``"resolved"``: the median ratio of interleaved pairs and the ratio of the minima.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: vae_zoo sits beside this file

import numpy as np  # noqa: E402
import torch  # noqa: E402

import impartial  # noqa: E402
from impartial import solvers  # noqa: E402
from vae_zoo.train import Config, batches, build  # noqa: E402


def check(method: str, repeats: int = 200) -> str:
    torch.manual_seed(0)
    model, d, _ = build(Config(model="hivae", dataset="wine", seed=0))
    batch = next(batches(d, 32, torch.Generator().manual_seed(0)))
    grads, times = {}, {"resolved": [], "direct": []}
    for rep in range(repeats + 1):  # repeat 0 warms up; the order alternates so drift hits both
        for nested in ("resolved", "direct") if rep % 2 else ("direct", "resolved"):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(rep)  # the same Gumbel and Gaussian samples under both conventions
            tasks, also = model.loss(batch)
            t0 = time.perf_counter()
            impartial.backward(tasks, model.encoder_params, solver=solvers.get(method), also=also, nested=nested)
            if rep:
                times[nested].append(time.perf_counter() - t0)
            if rep == 1:
                grads[nested] = torch.cat([p.grad.reshape(-1) for p in model.enc_s.parameters()])
    a, b = grads["resolved"], grads["direct"]
    pairs = np.median(np.array(times["direct"]) / np.array(times["resolved"]))
    mins = min(times["direct"]) / min(times["resolved"])
    gap = float((b - a).norm() / a.norm())
    cost = f"time direct/resolved {pairs:.2f} (median), {mins:.2f} (min)"
    return f"{method}: encoder-of-s gradient differs by {gap:.0%}; {cost}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    for method in ("imtlg", "nsgd", "mgda"):
        print(check(method), flush=True)
