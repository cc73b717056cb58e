"""The library's user-error base and how the command line reports errors.

``UserError`` marks a problem with what the user gave (a config value, a path, the data): its
message is one line naming the problem and the fix. The CLI prints such errors, and the standard
ones a user's input causes (:data:`USER_ERRORS`), as ``distill-jax <cmd>: error: <message>``
without a traceback; anything else is a bug and gets a short line asking for ``--debug``.
"""

from __future__ import annotations

import re
import sys

MAX_MESSAGE_CHARS = 400

# tensorstore quotes its whole storage spec and source locations in every error.
_NOISE = re.compile(r"\s*\[(?:tensorstore_spec|source locations)=.*", re.S)


class UserError(ValueError):
    """A problem with the user's input (config, paths, data); the message says how to fix it."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
    IsADirectoryError, PermissionError)

# Library errors that are not ValueErrors, by module (checked only once the module is loaded, so
# reporting an error never imports tensorstore or the asset code).
_LIBRARY_USER_ERRORS = (("distill_jax.cache.store", "CacheError"), ("distill_jax.assets", "AssetError"))


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the user's input (else it is a bug)."""
    classes = list(USER_ERRORS)
    for module, name in _LIBRARY_USER_ERRORS:
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            classes.append(getattr(mod, name))
    return isinstance(err, tuple(classes))


def one_line(err: BaseException) -> str:
    """``err``'s message as one line: its first line, without tensorstore's quoted spec, and at
    most :data:`MAX_MESSAGE_CHARS` characters."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # str(KeyError) adds quotes
    else:
        text = str(err)
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}"
    text = _NOISE.sub("", text).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS - 3].rstrip() + "..."
    return text
