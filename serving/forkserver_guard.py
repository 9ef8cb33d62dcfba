"""Imported first by the fork server (a preload module): the fork server dies with the server.

The server puts its PID in ``METAPRUNE_SERVER_PID`` before it starts the fork server; here the
fork server asks for SIGKILL when that parent dies and publishes its own PID, which each worker
forked from it checks after asking for the same (see :mod:`metaprune.serving.fate`).
"""

import os

from metaprune.serving.fate import die_with_parent

_server = os.environ.get("METAPRUNE_SERVER_PID")
die_with_parent(int(_server) if _server and _server.isdigit() else None)
os.environ["METAPRUNE_FORKSERVER_PID"] = str(os.getpid())
