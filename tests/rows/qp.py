"""Registry rows (see registry.py)."""

from registry import SolverInfo

ROWS: list[SolverInfo] = []
