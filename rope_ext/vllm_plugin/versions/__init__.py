"""What differs between the vLLM versions the plugin supports: one adapter module per version.

Each adapter was written after reading that version's source, and names:

- ``VERSIONS``: the vLLM releases it serves;
- ``INTERNALS``: the vLLM internals it touches beyond those every supported version shares
  (:data:`rope_ext.vllm_plugin.compat.SHARED_INTERNALS`), checked at start-up like them;
- ``RUNNERS``: the model runners whose step layout the plugin hooks (:class:`~rope_ext.vllm_plugin.runner.
  RunnerHook`), each with how to read a step's batch from it and whether growth by re-rotation runs on it.

:func:`adapter` is the only place that reads ``vllm.__version__``; the rest of the plugin asks the
adapter. On a version with no adapter the plugin stays inert (see ``rope_ext.vllm_plugin.register``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# vLLM version -> adapter module. 0.33.0's internals are those of 0.32.0 (read from its wheel, not run).
ADAPTERS = {"0.32.0": "v0_32", "0.33.0": "v0_32", "0.34.0": "v0_34"}
SUPPORTED_VERSIONS = tuple(ADAPTERS)


def installed_version() -> str:
    import vllm

    return vllm.__version__.split("+")[0]  # a local build ("0.34.0+cpu") is its release


def adapter(version: str | None = None) -> ModuleType | None:
    """The adapter of ``version`` (default: the installed vLLM), or None when the plugin does not support it."""
    name = ADAPTERS.get(installed_version() if version is None else version)
    return None if name is None else importlib.import_module(f"{__name__}.{name}")
