"""Training methods, by name. Importing a method's module registers it."""

from kdlab.methods import at, byot, ce, combo, dkd, dml, eskd, fitnets, kd, rkd, sp  # noqa: F401  (registration)
from kdlab.methods.base import METHODS, Method, register_method

__all__ = ["METHODS", "Method", "register_method"]
