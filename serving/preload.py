"""Imported once by the fork server, so each worker process starts with torch already loaded.

Forking a warm process takes milliseconds where a fresh interpreter importing torch takes
seconds. Import failures are swallowed: a library module that does not import yet must not
stop the fork server (the job that needs it reports the error itself).
"""

from importlib import import_module

for _name in ("torch", "metaprune", "metaprune.measure", "metaprune.formats", "metaprune.prune",
              "metaprune.data", "metaprune.serving.worker"):
    try:
        import_module(_name)
    except Exception:  # noqa: BLE001 - see the module docstring
        pass
