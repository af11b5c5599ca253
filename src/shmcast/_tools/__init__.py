"""The tools built on the queues, kept apart from them: the ``shmcast`` command line
(``cli``) and what its subcommands run - ``demo``, ``stress``, ``bench`` (the comparative
benchmark), ``inspection`` (``ls``, ``inspect``, ``cleanup``) and ``keygen`` (CURVE keys for
the remote path).  The core, the endpoints and the transports import nothing from here."""
