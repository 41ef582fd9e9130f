"""The scope interpreter. Imports nothing else of effax; see README.md here."""

from effax.core import _errors, _interpreter
from effax.core._errors import *  # noqa: F403 - the names listed in `_errors.__all__`
from effax.core._interpreter import *  # noqa: F403 - the names listed in `_interpreter.__all__`

__all__ = _errors.__all__ + _interpreter.__all__
