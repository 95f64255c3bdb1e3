"""Errors that the CLI turns into a clear message and an exit code."""

import errno
from typing import Any, Callable, Optional

# Disk and device failures are the machine's, not the user's input: exit 1.
RUNTIME_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.ENOMEM, errno.EFBIG}


class DalleError(Exception):
    """A runtime failure the user can act on (exit code 1)."""

    exit_code = 1


class UsageError(DalleError):
    """Bad command-line use, a bad recipe or a bad file (exit code 2)."""

    exit_code = 2


class RegistryError(UsageError):
    """Unknown, duplicate or malformed component."""


class RecipeError(UsageError):
    """A recipe that does not validate; ``problems`` holds one line per mistake."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class NonFiniteError(DalleError):
    """A loss or gradient norm that is NaN or infinite.

    ``applied`` says whether the bad values already reached the weights (an
    optimizer step ran with them); when it is False the batch can be skipped
    and training can go on. ``step_discarded`` says the engine dropped every
    micro-batch accumulated for the current optimizer step, not only the last.
    """

    def __init__(self, what: str, value: float, *, applied: bool, step_discarded: bool = False) -> None:
        self.what, self.value, self.applied, self.step_discarded = what, value, applied, step_discarded
        super().__init__(f"{what} is {value}")


def os_error(exc: OSError, where: object = None) -> DalleError:
    """A file-system failure as a message naming the file; the user's path (2) or the machine (1)."""
    where = where or exc.filename or "a file"
    detail = exc.strerror or str(exc)
    if exc.errno in RUNTIME_ERRNOS:
        return DalleError(f"{where}: {detail}; free space (or memory) and rerun: files written before it are intact")
    return UsageError(f"{where}: {detail}")


def write_failed(path: object, exc: BaseException) -> DalleError:
    """Any failure while writing ``path`` (a full disk, a quota, an I/O error, a library's own write
    error such as safetensors') as one message naming it; what the file held before is untouched."""
    if isinstance(exc, OSError):
        return os_error(exc, path)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return DalleError(f"{path}: could not be written ({first}); free space and check the disk, then rerun: "
                      "what was there before is untouched")


def problem_lines(exc: Any, prefix: str = "", name: Optional[Callable[[tuple], str]] = None, model: Any = None) -> list[str]:
    """A pydantic ``ValidationError`` as one ``path: message`` line per problem: each path after ``prefix``
    (``name`` turns a location into what the user typed, a CLI flag say); an unknown key gets the field
    of ``model``'s block it was probably meant to be."""
    lines = []
    for error in exc.errors():
        path = name(error["loc"]) if name else ".".join(map(str, error["loc"]))
        path = ".".join(p for p in (prefix, path) if p)
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(str(error["loc"][-1]), _fields_at(model, error["loc"][:-1]), n=1) if model else []
            message = "unknown key (not a field of this block)" + (f"; did you mean {close[0]!r}?" if close else "")
        elif error["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return lines


def validation_problems(exc: Any, prefix: str = "", name: Optional[Callable[[tuple], str]] = None) -> str:
    """:func:`problem_lines` as one line: ``path: message; path: message``."""
    return "; ".join(problem_lines(exc, prefix, name))


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """The field names of the block at ``loc`` inside ``model`` (through Optional, lists, dicts), or []."""
    for part in loc:
        if isinstance(part, int) or model is None:
            continue  # an item of a list or a dict: the same block type
        field = getattr(model, "model_fields", {}).get(part)
        model = _block_type(field.annotation) if field is not None else None
    return list(getattr(model, "model_fields", {}))


def _block_type(annotation: Any) -> Optional[type]:
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in typing.get_args(annotation) if (found := _block_type(arg)) is not None), None)
