"""One exception type for bad user input, and the one place that turns library errors into it.

The CLI prints a `UserError`'s message on one line and exits non-zero (`cli.user_errors`). Libraries raise
their own types for what is still the user's input (a config field of the wrong type, a truncated safetensors
file, a full disk, no network): `describe` gives such an error one line, `library_errors()` are the types it
knows, and `translated(...)` re-raises them as a `UserError` that names what was being read or written and the
fix."""

from __future__ import annotations

import contextlib
import errno
import re


class UserError(ValueError):
    """A problem with what the user asked for; the message names the problem and the fix."""


# OSErrors that mean "this place cannot be written": the user picks another place or frees space.
WRITE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.EFBIG,
    }
)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].strip()


def _strict_dataclass_errors() -> tuple[type[BaseException], ...]:
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub
        return ()
    return (StrictDataclassError,)


def _safetensors_errors() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:
        return ()
    return (SafetensorError,)


def network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when there is no network (requests' ConnectionError is an OSError)."""
    import importlib

    found: list[type[BaseException]] = []
    for name in ("httpx", "httpx2"):  # huggingface_hub 1.x uses httpx, 2.x its fork httpx2
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(name).TransportError)
    with contextlib.suppress(ImportError):
        import requests

        found += [requests.ConnectionError, requests.Timeout]
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import OfflineModeIsEnabled

        found.append(OfflineModeIsEnabled)
    return tuple(found)


def library_errors() -> tuple[type[BaseException], ...]:
    """The library error types `describe` knows (beyond the plain TypeError / ValueError of a bad value)."""
    return (
        OSError,
        UnicodeDecodeError,
        *_strict_dataclass_errors(),
        *_safetensors_errors(),
        *network_errors(),
    )


def write_error(err: BaseException) -> bool:
    """Whether `err` says that a place cannot be written (full disk, read-only, not a folder, ...)."""
    if isinstance(err, OSError):
        return err.errno in WRITE_ERRNOS
    if isinstance(err, _safetensors_errors()):  # safetensors reports the OS error inside its own type
        match = _OS_ERROR.search(str(err))
        return match is not None and int(match[1]) in WRITE_ERRNOS
    return False


def describe(err: BaseException, paths: bool = True) -> str:
    """One line for `err`, in our words where we know the library's type (an OSError's file names only with
    `paths`: a writer names its target itself, not its temporary file)."""
    import os

    if isinstance(err, _strict_dataclass_errors()):
        field = re.search(r"field '([^']+)'", str(err))
        cause = err.__cause__ or err.__context__
        detail = _first_line(cause) if cause is not None else _first_line(err)
        return f"field {field[1]!r}: {detail}" if field and field[1] not in detail else detail
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
    if isinstance(err, network_errors()):
        return f"no connection to the Hub ({type(err).__name__}: {_first_line(err)})"
    if isinstance(err, OSError) and err.strerror:
        name = err.filename2 or err.filename
        return f"{err.strerror} ({name})" if name and paths else err.strerror
    if isinstance(err, _safetensors_errors()):
        match = _OS_ERROR.search(str(err))
        if match:
            return os.strerror(int(match[1]))
    return _first_line(err)


@contextlib.contextmanager
def translated(what: str, fix: str, types: tuple[type[BaseException], ...] | None = None):
    """Re-raise a library error of `types` (default: `library_errors()`) inside the block as
    `UserError(f"{what}: {describe(err)}; {fix}")`."""
    caught = types or library_errors()
    try:
        yield
    except UserError:
        raise
    except caught as err:
        raise UserError(f"{what}: {describe(err)}; {fix}") from None
