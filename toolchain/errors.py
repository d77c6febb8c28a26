"""Error types that map to the CLI's exit codes.

Exit code 2 means "bad input" (a file, a spec, an option or a configuration the user gave us),
exit code 1 means "the job ran but a budget or floor failed". Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class RcompError(Exception):
    """Bad user input: printed as one line by the CLI, exit code 2."""

    exit_code = 2


class ConfigError(RcompError):
    """A YAML file (profile, recipe) that does not follow its schema.

    The message names the file, the key path (``budgets.mops``) and what was expected.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None):
        where = ": ".join(p for p in (path, key) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.key = key


class DataError(RcompError):
    """A data spec that is malformed or points at something that is not a usable dataset."""


class CheckpointError(RcompError):
    """A checkpoint that is missing, corrupt, or belongs to another architecture."""


class NumericalError(RuntimeError):
    """A non-finite loss or gradient during training (exit code 3, the run is stopped)."""

    exit_code = 3


class TrainingCollapse(NumericalError):
    """Catastrophic overfitting the guard could not recover from, with no usable model to return.

    Exit code 3 like a non-finite loss: the run stopped and wrote no model; its checkpoints stay.
    """
