"""Discharge: an effectful function plus the built-in handlers becomes pure `init` and `apply`; see README.md here."""

from effax.discharge._transform import MultiTransformed, Transformed, multi_transform, transform

__all__ = ["MultiTransformed", "Transformed", "multi_transform", "transform"]
