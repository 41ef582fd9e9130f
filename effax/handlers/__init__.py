"""The built-in handlers, one module per family."""

from effax.handlers._intercept import CaptureIntermediates, InterceptMethods
from effax.handlers._mode import Mode
from effax.handlers._params import AbstractParams, InitParams, LoadParams
from effax.handlers._presets import Preset, eval, train  # noqa: A004
from effax.handlers._random import KeysFromRngs
from effax.handlers._share import Share, ShareBinding, share
from effax.handlers._side_inputs import SideInputs
from effax.handlers._side_outputs import CollectSown
from effax.handlers._state import FrozenState, FunctionalState

__all__ = [
    "AbstractParams", "CollectSown", "FrozenState", "FunctionalState", "InitParams",
    "KeysFromRngs", "LoadParams", "Mode", "SideInputs", "Preset", "train", "eval", "Share", "ShareBinding", "share",
    "InterceptMethods", "CaptureIntermediates",
]
