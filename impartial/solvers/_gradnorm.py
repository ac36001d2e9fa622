"""SCAFFOLD: to be replaced by the real implementation."""
from ._base import GramSolver


class NSGD(GramSolver):
    pass


class GradNorm(GramSolver):
    pass
