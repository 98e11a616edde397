"""The parallel layout of a run (checked before any process starts), its process groups and the
memory planner.

Import-light: importing the package (the CLI does, to register ``plan-memory``) loads nothing;
``layout`` and ``memory`` need only the config and model presets (and torch); ``distributed``
(megatron-core parallel state) loads when imported by name.
"""

__all__ = ["ParallelLayout", "check_run_config"]


def __getattr__(name):
    if name in __all__:
        from . import layout

        return getattr(layout, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
