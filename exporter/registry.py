"""The engine registry's framework-facing API at the path frameworks import::

    from exporter.registry import registered_engine

The code lives in exporter/engines/registry.py; this module only names its public part.
"""

from exporter.engines.registry import (
    DEFAULT_DIR,
    KINDS,
    REGISTRY_ENV,
    STATES,
    EngineEntry,
    RegistryError,
    engine_asleep,
    register_engine,
    registered_engine,
    set_engine_state,
    unregister_engine,
)

__all__ = [
    "DEFAULT_DIR",
    "KINDS",
    "REGISTRY_ENV",
    "STATES",
    "EngineEntry",
    "RegistryError",
    "engine_asleep",
    "register_engine",
    "registered_engine",
    "set_engine_state",
    "unregister_engine",
]
