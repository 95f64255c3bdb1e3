"""Errors that the CLI turns into a clear message and an exit code."""


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
