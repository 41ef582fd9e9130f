"""effax: an effect-handler runtime for JAX models.

Model code requests what it needs (`fx.param`, `fx.local_state`,
`fx.next_key`, `fx.side_input`, `fx.sow`, `fx.is_training`); handlers answer;
`fx.transform` discharges the model into pure `init` and `apply`.
"""

from effax import handlers
from effax._transform import Transformed, VariablesReport, check_variables, transform
from effax.core import (
    EffaxError,
    FrozenStateError,
    Handler,
    InvalidNameError,
    MissingRngError,
    MissingVariableError,
    ParamConflictError,
    Request,
    ShapeMismatchError,
    ShareError,
    TraceMismatchError,
    UnhandledEffectError,
    current_path,
    handle,
    scope,
)
from effax.effects import (
    GetStateRequest,
    LocalStateEffect,
    LocalStateRequest,
    ModeRequest,
    ParamRequest,
    RandomEffect,
    RandomRequest,
    SetStateRequest,
    SideInputEffect,
    SideInputRequest,
    SideOutputEffect,
    SideOutputRequest,
    StreamKeyRequest,
    is_training,
    local_state,
    next_key,
    param,
    random_stream,
    side_input,
    sow,
    stream_key,
)

__all__ = [
    # effect operations
    "param", "local_state", "next_key", "random_stream", "stream_key", "side_input", "sow",
    "is_training", "scope", "current_path",
    # effect protocols and requests
    "LocalStateEffect", "RandomEffect", "SideInputEffect", "SideOutputEffect",
    "Request", "ParamRequest", "LocalStateRequest", "GetStateRequest", "SetStateRequest",
    "RandomRequest", "StreamKeyRequest", "SideInputRequest", "SideOutputRequest", "ModeRequest",
    # handlers and discharge
    "Handler", "handle", "handlers", "transform", "Transformed", "check_variables", "VariablesReport",
    # errors
    "EffaxError", "UnhandledEffectError", "MissingVariableError", "ShapeMismatchError",
    "ParamConflictError", "FrozenStateError", "MissingRngError", "ShareError", "InvalidNameError",
    "TraceMismatchError",
]
