"""specdec: faster LLM generation with unchanged output (speculative decoding)."""

from specdec.errors import SpecdecError

__version__ = "0.1.0"


def load(*args, **kwargs):  # imported lazily: torch is slow to import
    """Load a model by known name, GGUF path, safetensors folder or hub id; see `specdec.api`."""
    from specdec.api import load as _load

    return _load(*args, **kwargs)


__all__ = ["SpecdecError", "__version__", "load"]
