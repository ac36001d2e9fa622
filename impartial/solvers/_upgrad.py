"""SCAFFOLD: to be replaced by the real implementation."""
from ._base import GramSolver


class DualProj(GramSolver):
    pass


class UPGrad(GramSolver):
    pass
