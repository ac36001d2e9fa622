"""SCAFFOLD: to be replaced by the real implementation."""
from ._base import GramSolver


class ConFIG(GramSolver):
    pass
