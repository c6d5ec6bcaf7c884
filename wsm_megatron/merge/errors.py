"""The one error type of the merge: a user-facing failure with a precise message."""

from __future__ import annotations


class MergeError(ValueError):
    """The merge cannot proceed; the message names the checkpoint and tensor concerned.

    Raised for invalid options, missing/incomplete/inconsistent inputs, non-finite values and
    an existing output. The CLI prints it as one ``wsm-merge: error: ...`` line.
    """
