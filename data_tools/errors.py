"""The one exception type the CLI turns into `error: ...` and a non-zero exit."""
from __future__ import annotations


class DataToolsError(Exception):
    """Bad input or configuration; the message names the file, line or key.

    ``raised_on_rank``: set when an MPI job raises the same error on every rank (each must leave
    its collectives); only rank 0 reports it.
    """

    def __init__(self, message: str, raised_on_rank: int | None = None):
        super().__init__(message)
        self.raised_on_rank = raised_on_rank

    @property
    def reported_here(self) -> bool:
        return self.raised_on_rank in (None, 0)
