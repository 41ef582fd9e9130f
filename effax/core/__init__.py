"""The scope interpreter. Imports nothing else of effax; see README.md here."""

from effax.core._errors import (
    EffaxError,
    FrozenStateError,
    InvalidNameError,
    MissingRngError,
    MissingVariableError,
    ParamConflictError,
    ShapeMismatchError,
    ShareError,
    TraceMismatchError,
    UnhandledEffectError,
)
from effax.core._interpreter import (
    Handler,
    Path,
    Request,
    answers_of,
    at_path,
    check_name,
    check_trace,
    current_path,
    current_stack,
    flatten_handlers,
    handle,
    hermetic,
    is_stateless,
    path_str,
    scope,
    send,
    trace_state,
    under_stack,
)
from effax.core._naming import Names, current_names, pop_names, push_names
from effax.core._tree import MISSING, PathTree, copy_scopes, flatten_paths, get_path, nearest_paths

__all__ = [
    "EffaxError", "FrozenStateError", "InvalidNameError", "MissingRngError", "MissingVariableError",
    "ParamConflictError", "ShapeMismatchError", "ShareError", "TraceMismatchError",
    "UnhandledEffectError", "Handler", "answers_of", "Path", "Request", "at_path", "check_name", "check_trace",
    "current_path", "current_stack", "under_stack", "flatten_handlers", "handle", "hermetic", "is_stateless",
    "path_str", "scope",
    "send", "trace_state", "MISSING", "PathTree", "copy_scopes", "flatten_paths", "get_path", "nearest_paths",
    "Names", "current_names", "push_names", "pop_names",
]
