"""Claims the documentation makes about the code, checked against the code (the site itself is built by .ci/run)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import impartial
from impartial import solvers

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_the_nested_default_is_stated_once_and_matches_the_signature() -> None:
    default = inspect.signature(impartial.backward).parameters["nested"].default
    stated = re.findall(r'The default is `nested="(\w+)"`', (DOCS / "blocks.md").read_text())
    assert stated == [default]
    for page in [*DOCS.glob("*.md"), ROOT / "README.md"]:  # nowhere else
        if page.name != "blocks.md":
            text = page.read_text()
            assert not re.search(r'"(resolved|direct)"`? \(the default\)|default[^\n]{0,20}nested=', text), page


def _scale_rows() -> dict[str, str]:
    text = (DOCS / "solvers.md").read_text()
    table = text.split("<!-- scale-invariance:begin -->")[1].split("<!-- scale-invariance:end -->")[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        name, invariant = (c.strip() for c in line.strip("|").split("|")[:2])
        rows[re.sub(r"[` ]|\(default\)", "", name)] = invariant
    return rows


@pytest.mark.parametrize("name", [n for n in _scale_rows() if not n.startswith("Compose")])
def test_scale_invariance_column_is_measured(name: str) -> None:
    """Rescaling the task gradients leaves the direction of a "yes" row unchanged, and moves that of a "no" row."""
    claim = _scale_rows()[name].split()[0]
    g = torch.Generator().manual_seed(0)
    J = torch.randn(4, 50, generator=g, dtype=torch.float64)
    D = torch.tensor([100.0, 1.0, 0.01, 3.0], dtype=torch.float64)[:, None]

    def make() -> solvers.Solver:
        cls = getattr(solvers, name)
        kw = {"alpha": 0.0} if name == "GradNorm" else {}  # the default progress needs the losses
        if "generator" in inspect.signature(cls).parameters:
            kw["generator"] = torch.Generator().manual_seed(1)
        return cls(**kw)

    a, b = make()(J), make()(J * D)
    cos = float(a @ b / (a.norm() * b.norm()))
    assert claim in ("yes", "no"), f"{name}: the column must start with yes or no, got {claim!r}"
    assert (abs(cos - 1) < 1e-9) == (claim == "yes"), f"{name}: cosine {cos} after rescaling, docs say {claim!r}"


def test_every_public_solver_has_a_row() -> None:
    public = {n for n in solvers.__all__ if isinstance(getattr(solvers, n), type)}
    public -= {"Solver", "GramSolver", "Solution", "Status"}
    assert public <= set(_scale_rows()) | {"Compose"}, public - set(_scale_rows())


def test_gradvac_rebuilt_every_call_is_pcgrad() -> None:
    """docs/paper.md: the reference's GradVac, whose EMA targets are rebuilt at every call, is PCGrad."""
    for seed in range(5):
        J = torch.randn(5, 30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        pc = solvers.PCGrad(generator=torch.Generator().manual_seed(seed))(J)
        gv = solvers.GradVac(generator=torch.Generator().manual_seed(seed))(J)
        torch.testing.assert_close(gv, pc, rtol=1e-12, atol=1e-12)


def test_readme_names_the_extra_that_graph_draw_needs() -> None:
    for line in (ROOT / "README.md").read_text().splitlines():
        if "graph.draw(" in line:
            assert "[graph]" in line or "graph extra" in line, line
