"""Lifted transforms: `fx.scan`, `fx.vmap` and `fx.remat` over effectful code; see README.md here."""

from effax.lift._cond import cond, switch
from effax.lift._transforms import StackedInit, remat, scan, vmap

__all__ = ["StackedInit", "cond", "remat", "scan", "switch", "vmap"]
