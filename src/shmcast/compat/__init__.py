"""Drop-in replacements for the queues of other projects, built on shmcast's queues.

- :mod:`shmcast.compat.vllm`: vLLM's ``shm_broadcast.MessageQueue`` and its plugin.
"""
