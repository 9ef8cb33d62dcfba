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

# The library imports lazily (a plain in-process prune stays quick); a job process should not
# pay for that on every job (~1.7 s: torch-geometric and its pandas/pyarrow), so import here.
for _name in ("torch", "metaprune", "metaprune.measure", "metaprune.formats", "metaprune.pruning",
              "metaprune.data", "metaprune.zoo", "metaprune.finetune", "metaprune.graph",
              "metaprune.metanet", "metaprune.metanet.scope", "metaprune.serving.worker"):
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
    from metaprune.serving.worker import pruning_facts

    with tempfile.TemporaryDirectory(prefix="metaprune-warmup-") as folder:
        for suffix in (".pt2", ".safetensors"):  # both input formats, as uploads and jobs use them
            model, example_inputs = small_model(seed=0)
            path = Path(folder) / f"warm{suffix}"
            save_model(model, example_inputs, path)
            model, example_inputs = load_model(path)
            pruning_facts(model, example_inputs)
            result = prune(model, example_inputs, method="l2", speedup=2.0)
            save_model(result.model, example_inputs, Path(folder) / f"pruned{suffix}")


try:
    _warm_up()
except Exception:  # noqa: BLE001 - see the module docstring
    pass
