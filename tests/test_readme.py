"""The README's solver table is generated from the registry; this test keeps it true.

Regenerate with ``python tests/test_readme.py --write``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from registry import rows

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- solver-table:begin -->", "<!-- solver-table:end -->"

PAPERS = {
    "Sum": "— (plain `backward`)",
    "Mean": "—",
    "Random": "Lin et al., TMLR 2022 (RLW)",
    "Compose": "Javaloy et al., ICML 2022 (method chains)",
    "PCGrad": "Yu et al., NeurIPS 2020",
    "GradVac": "Wang et al., ICLR 2021",
    "GradDrop": "Chen et al., NeurIPS 2020",
    "GradNorm": "Chen et al., ICML 2018",
    "NSGD": "Javaloy et al., ICML 2022 (torchmoo)",
    "IMTLG": "Liu et al., ICLR 2021 (IMTL-G)",
    "MGDA": "Sener & Koltun, NeurIPS 2018 (MGDA-UB)",
    "CAGrad": "Liu et al., NeurIPS 2021",
    "UPGrad": "Quinton & Rey, 2024",
    "DualProj": "Quinton & Rey, 2024",
    "NashMTL": "Navon et al., ICML 2022",
    "FairGrad": "Ban & Ji, ICML 2024",
    "AlignedMTL": "Senushkin et al., CVPR 2023",
    "ConFIG": "Liu et al., ICLR 2025",
}
ORDER = [
    "k1",
    "permutation",
    "homogeneous",
    "rotation",
    "batched",
    "vmap",
    "compile",
    "gram_path",
    "reference",
    "checkpoint",
]


def table() -> str:
    lines = ["| registry row | paper | Gram space | invariants claimed (each tested) |", "|---|---|---|---|"]
    for r in rows():
        solver = r.make()
        # test-only subclasses (fixed random draws) take their parent's paper
        name = next(c.__name__ for c in type(solver).__mro__ if c.__name__ in PAPERS)
        claims = ", ".join(c for c in ORDER if c in r.claims)
        lines.append(f"| `{r.id}` | {PAPERS[name]} | {'yes' if solver.gram_space else 'no'} | {claims} |")
    return "\n".join(lines)


def test_readme_solver_table_matches_registry() -> None:
    text = README.read_text()
    match = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, re.S)
    assert match, "README lacks the solver-table markers"
    assert match.group(1).strip() == table(), "README's solver table is stale: run python tests/test_readme.py --write"


if __name__ == "__main__":
    if "--write" in sys.argv:
        text = README.read_text()
        new = re.sub(
            re.escape(BEGIN) + r"\n.*?" + re.escape(END), lambda m: f"{BEGIN}\n{table()}\n{END}", text, flags=re.S
        )
        README.write_text(new)
    else:
        print(table())
