"""Effect requests and the operations model code calls; one module per effect."""

from effax.effects._capture import CaptureRequest, capture_filter
from effax.effects._initializing import InitializingRequest, is_initializing
from effax.effects._mode import ModeRequest, is_training
from effax.effects._module_call import ModuleCallRequest, call_module, sees_module_calls
from effax.effects._param import ParamRequest, param
from effax.effects._random import (
    RandomEffect,
    RandomRequest,
    StreamKeyRequest,
    StreamNamesRequest,
    next_key,
    random_stream,
    stream_key,
    stream_names,
)
from effax.effects._side_input import SideInputEffect, SideInputRequest, side_input
from effax.effects._side_output import SideOutputEffect, SideOutputRequest, sow
from effax.effects._state import (
    READ_AHEAD,
    GetStateRequest,
    LocalStateEffect,
    LocalStateRequest,
    SetStateRequest,
    local_state,
)

__all__ = [
    "ModeRequest", "is_training", "ParamRequest", "param", "RandomEffect", "RandomRequest",
    "StreamKeyRequest", "StreamNamesRequest", "next_key", "random_stream", "stream_key", "stream_names",
    "SideInputEffect", "SideInputRequest", "side_input", "SideOutputEffect", "SideOutputRequest", "sow",
    "GetStateRequest", "LocalStateEffect", "LocalStateRequest", "SetStateRequest", "local_state", "READ_AHEAD",
    "ModuleCallRequest", "call_module", "sees_module_calls", "InitializingRequest", "is_initializing",
    "CaptureRequest", "capture_filter",
]
