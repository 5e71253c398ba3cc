"""Training methods, by name. Importing a method's module registers it."""

from kdlab.methods import (  # noqa: F401  (registration)
    at,
    byot,
    ce,
    combo,
    dkd,
    dml,
    eskd,
    fitnets,
    kd,
    paper_snippet,
    qat,
    rkd,
    sp,
)
from kdlab.methods.base import METHODS, Method, register_method

__all__ = ["METHODS", "Method", "register_method"]
