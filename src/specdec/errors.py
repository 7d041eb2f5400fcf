"""Errors a user can cause. Each carries a one-line message; the CLI prints it
without a traceback and exits non-zero."""


class SpecdecError(Exception):
    """Base class of every user-facing error."""

    exit_code = 2


class ModelNotFoundError(SpecdecError):
    """A model name, path or hub id that cannot be resolved."""


class ModelFormatError(SpecdecError):
    """A model file that is corrupt, truncated or not what its name says."""


class UnsupportedModelError(SpecdecError):
    """An architecture, tensor type or option the runtime does not handle."""


class RegistryUnreachableError(SpecdecError):
    """The package registry (for `pull`) or the model hub cannot be reached."""


class IntegrityError(SpecdecError):
    """A downloaded file whose checksum is not the expected one."""


class InvalidRequestError(SpecdecError):
    """Bad generation input: empty prompt, prompt longer than the context, bad option."""
