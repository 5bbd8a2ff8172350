# Copyright (c) fairseq_dp contributors. MIT license.
"""Exceptions for user mistakes.

A ``DPConfigError`` is a mistake in what the user asked for (flags, files,
checkpoints), with a message that says what to change; command-line entry
points print its message alone and exit non-zero. Any other exception is a
bug and keeps its traceback.

How the message reaches the user without a traceback, without touching
fairseq's code:

- ``fairseq-train``, ``fairseq-validate``, ``python -m fairseq_cli.*`` and the
  plugin's own commands: importing the plugin installs a ``sys.excepthook``
  (:func:`install_excepthook`), chained to the one before it. It prints a
  ``DPConfigError`` found in the uncaught exception or in its ``__cause__`` /
  ``__context__`` chain (fairseq re-raises a failed checkpoint load as
  "Cannot load model parameters ...", whose context is the plugin's error),
  and also the error text of a worker started by ``torch.multiprocessing.spawn``
  (the parent re-raises it as ``ProcessRaisedException`` with the worker's
  traceback as text). Everything else goes to the previous hook unchanged.
- ``fairseq-hydra-train``: Hydra catches exceptions itself before any
  excepthook and prints the message alone for its ``CompactHydraException``,
  which ``DPConfigError`` therefore also subclasses.
"""

import os
import re
import sys
from typing import Optional

try:  # fairseq depends on hydra; the plugin's own commands work without it
    from hydra.errors import CompactHydraException as _HydraCompact
except ImportError:  # pragma: no cover
    class _HydraCompact(Exception):
        pass


class DPConfigError(ValueError, _HydraCompact):
    """A setting, file or checkpoint that the plugin refuses, with what to change."""


# how a spawned worker's error looks in the traceback text the parent re-raises:
# the exception's qualified class name, then its message up to the next blank line
_SPAWNED = re.compile(
    r"^(fairseq_dp(?:\.\w+)+): (.*?)(?=\n\n|\nThe above exception|\nDuring handling|\Z)",
    re.S | re.M,
)


def _is_user_error_class(qualified_name: str) -> bool:
    """Whether a class named in a worker's traceback text is a DPConfigError
    (PrivacyBudgetExhausted, LedgerMismatch... are subclasses)."""
    module_name, _, class_name = qualified_name.rpartition(".")
    module = sys.modules.get(module_name)
    cls = getattr(module, class_name, None)
    return isinstance(cls, type) and issubclass(cls, DPConfigError)


def user_error_message(exc: BaseException) -> Optional[str]:
    """The message to print for ``exc`` if it is (or was caused by) a user
    mistake, else None."""
    seen = set()
    outer = exc
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DPConfigError):
            if exc is not outer and str(outer):
                # keep fairseq's own line (it names the file) above the reason
                return f"{str(outer).strip()}\n{exc}"
            return str(exc)
        if type(exc).__name__ == "ProcessRaisedException":
            # the text lists chained exceptions innermost first; report the
            # outermost user error, as for an exception of this process
            found = [m.group(2).rstrip() for m in _SPAWNED.finditer(str(exc)) if _is_user_error_class(m.group(1))]
            if found:
                return found[-1]
        exc = exc.__cause__ or exc.__context__
    return None


def _program_name() -> str:
    path = sys.argv[0] if sys.argv and sys.argv[0] else ""
    name = os.path.basename(path)
    parent = os.path.dirname(path)
    if name.endswith(".py") and os.path.isfile(os.path.join(parent, "__init__.py")):
        # python -m fairseq_cli.train / fairseq_dp.convert: name the module
        stem = os.path.splitext(name)[0]
        package = os.path.basename(parent)
        return package if stem == "__main__" else f"{package}.{stem}"
    return name or "python"


def _dp_excepthook(exc_type, exc, tb):
    message = user_error_message(exc) if isinstance(exc, BaseException) else None
    if message is None:
        return _dp_excepthook.previous(exc_type, exc, tb)
    sys.stderr.write(f"{_program_name()}: error: {message}\n")
    sys.stderr.flush()
    # the interpreter then exits with status 1, as after any uncaught exception


def install_excepthook() -> None:
    """Print user mistakes without a traceback (see the module docstring).
    Idempotent; chained to whatever hook was installed before."""
    if getattr(sys.excepthook, "__name__", None) == "_dp_excepthook":
        return
    _dp_excepthook.previous = sys.excepthook
    sys.excepthook = _dp_excepthook
