"""The built-in handlers, one module per family."""

from effax.handlers._intercept import CaptureIntermediates, InterceptMethods
from effax.handlers._mode import Mode
from effax.handlers._mode import static_training as static_training
from effax.handlers._params import AbstractParams, InitParams, LoadParams
from effax.handlers._presets import Preset, eval, train  # noqa: A004
from effax.handlers._random import KeysFromRngs
from effax.handlers._random import check_key as check_key
from effax.handlers._share import Share, ShareBinding, share
from effax.handlers._side_inputs import SideInputs
from effax.handlers._side_outputs import CollectSown
from effax.handlers._state import ALL as ALL
from effax.handlers._state import FrozenState, FunctionalState
from effax.handlers._state import InitState as InitState
from effax.handlers._state import normalize_mutable as normalize_mutable

__all__ = [
    "AbstractParams", "CollectSown", "FrozenState", "FunctionalState", "InitParams",
    "KeysFromRngs", "LoadParams", "Mode", "SideInputs", "Preset", "train", "eval", "Share", "ShareBinding", "share",
    "InterceptMethods", "CaptureIntermediates",
]
# re-exported `x as x` above for the discharge (not public): ALL, InitState, check_key, normalize_mutable,
# static_training
