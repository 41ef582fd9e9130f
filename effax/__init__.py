"""effax: an effect-handler runtime for JAX models.

Model code requests what it needs (`fx.param`, `fx.local_state`,
`fx.next_key`, `fx.side_input`, `fx.sow`, `fx.is_training`); handlers answer;
`fx.transform` discharges the model into pure `init` and `apply`.
"""

from effax import checkpoint, handlers, inspect, lift, nn, sharding
from effax.checkpoint import (
    CheckpointCorruptError,
    CheckpointIOError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
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
from effax.discharge import MultiTransformed, Transformed, multi_transform, transform
from effax.effects import (
    CaptureRequest,
    GetStateRequest,
    InitializingRequest,
    LocalStateEffect,
    LocalStateRequest,
    ModeRequest,
    ModuleCallRequest,
    ParamRequest,
    RandomEffect,
    RandomRequest,
    SetStateRequest,
    SideInputEffect,
    SideInputRequest,
    SideOutputEffect,
    SideOutputRequest,
    StreamKeyRequest,
    is_initializing,
    is_training,
    local_state,
    next_key,
    param,
    random_stream,
    side_input,
    sow,
    stream_key,
)
from effax.effects._param import UninitializedParamError
from effax.handlers._share import ShareBinding, share
from effax.inspect import Inventory, RequestRecord, Summary, VariablesReport, check_variables, effects_of, summary
from effax.interop import from_flax, from_nnx
from effax.lift import StackedInit, cond, remat, scan, switch, vmap
from effax.sharding import ShardingError

__all__ = [
    # effect operations
    "param", "local_state", "next_key", "random_stream", "stream_key", "side_input", "sow",
    "is_training", "is_initializing", "scope", "current_path",
    # effect protocols and requests
    "LocalStateEffect", "RandomEffect", "SideInputEffect", "SideOutputEffect",
    "Request", "ParamRequest", "LocalStateRequest", "GetStateRequest", "SetStateRequest",
    "RandomRequest", "StreamKeyRequest", "SideInputRequest", "SideOutputRequest", "ModeRequest",
    "ModuleCallRequest", "InitializingRequest", "CaptureRequest",
    # lifted transforms
    "scan", "vmap", "remat", "cond", "switch", "StackedInit",
    # handlers and discharge
    "Handler", "handle", "handlers", "nn", "transform", "Transformed", "check_variables",
    "multi_transform", "MultiTransformed", "VariablesReport",
    # subpackages: checkpoints, sharding, lifted transforms, inspection
    "checkpoint", "sharding", "lift", "inspect", "summary", "Summary",
    "CheckpointMismatchError", "CheckpointNotFoundError", "CheckpointCorruptError", "CheckpointIOError",
    "ShardingError",
    # errors
    "EffaxError", "UnhandledEffectError", "MissingVariableError", "ShapeMismatchError",
    "ParamConflictError", "FrozenStateError", "MissingRngError", "ShareError", "InvalidNameError",
    "TraceMismatchError", "UninitializedParamError",
    # weight tying and the effect inventory
    "share", "ShareBinding", "effects_of", "RequestRecord", "Inventory",
    # interop
    "from_flax", "from_nnx",
]
