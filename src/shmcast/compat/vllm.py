"""shmcast as vLLM's ``shm_broadcast.MessageQueue`` (checked against vLLM 0.33.0).

Two ways to switch (docs/vllm.md):

- the vLLM plugin: ``pip install 'shmcast[vllm]'`` registers the entry point ``shmcast`` in the
  group ``vllm.general_plugins``; every vLLM process then uses shmcast's queue.
  ``SHMCAST_VLLM=0`` (or vLLM's ``VLLM_PLUGINS`` without ``shmcast``) turns it off;
- one import, for code that builds its own queues::

      from shmcast.compat.vllm import MessageQueue

  or :func:`install` to switch vLLM's modules by hand.

Importing this module imports neither torch nor vLLM.
"""

from ._vllm_plugin import VllmVersionError, install, installed, plugin, uninstall
from ._vllm_queue import Handle, MessageQueue

__all__ = [
    "Handle",
    "MessageQueue",
    "VllmVersionError",
    "install",
    "installed",
    "plugin",
    "uninstall",
]
