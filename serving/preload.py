"""Imported once by the fork server, so each worker process starts warm.

Forking a warm process takes milliseconds; a fresh interpreter importing torch takes seconds,
and the first load/prune/save round trip pays as much again in lazy imports and one-time
initialisation (torch.export, torch-pruning). The fork server therefore imports the library and
runs that round trip once on a small zoo model, single-threaded (no OpenMP pool exists before
the fork), and every job is forked from the result.

Failures are swallowed: a library module that does not import must not stop the fork server
(the job that needs it reports the error itself).
"""

import tempfile
from importlib import import_module
from pathlib import Path

for _name in ("torch", "metaprune", "metaprune.measure", "metaprune.formats", "metaprune.pruning",
              "metaprune.data", "metaprune.serving.worker"):
    try:
        import_module(_name)
    except Exception:  # noqa: BLE001 - see the module docstring
        pass


def _warm_up() -> None:
    import torch
    from metaprune.formats import load_model, save_model
    from metaprune.pruning import prune
    from metaprune.serving.samples import small_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="metaprune-warmup-") as folder:
        model, example_inputs = small_model(seed=0)
        path = Path(folder) / "warm.pt2"
        save_model(model, example_inputs, path)
        model, example_inputs = load_model(path)
        result = prune(model, example_inputs, method="l2", speedup=2.0)
        save_model(result.model, example_inputs, Path(folder) / "pruned.pt2")


try:
    _warm_up()
except Exception:  # noqa: BLE001 - see the module docstring
    pass
