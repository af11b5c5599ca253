"""Load vLLM's general plugins in every Python process of a ``make test-vllm`` run.

vLLM loads its plugins (``vllm.plugins.load_general_plugins``) in each process it starts; vLLM's
queue tests start their processes themselves (forked, and spawned for one test), so this does it
for them: it is on ``PYTHONPATH`` only for that run, and when ``SHMCAST_VLLM_EVERY_PROCESS=1``
it loads the plugins right after vLLM's ``shm_broadcast`` module is first imported, before any
test module takes ``MessageQueue`` from it.  Nothing is imported early: a process that never
imports vLLM is left alone.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

TARGET = "vllm.distributed.device_communicators.shm_broadcast"


class _LoadPluginsAfter(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of TARGET to load the plugins after it ran."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_load_plugins(module):
            exec_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            from vllm.plugins import load_general_plugins

            load_general_plugins()

        spec.loader.exec_module = exec_then_load_plugins
        return spec


if os.environ.get("SHMCAST_VLLM_EVERY_PROCESS") == "1":
    sys.meta_path.insert(0, _LoadPluginsAfter())
