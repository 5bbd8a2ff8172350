# Copyright (c) fairseq_dp contributors. MIT license.
"""Exceptions for user mistakes.

A ``DPConfigError`` is a mistake in what the user asked for (flags, files,
checkpoints), with a message that says what to change; command-line entry
points print its message alone and exit non-zero. Any other exception is a
bug and keeps its traceback.
"""


class DPConfigError(ValueError):
    """A setting, file or checkpoint that the plugin refuses, with what to change."""
