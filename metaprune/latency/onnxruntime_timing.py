"""Latency in ONNX Runtime, when it is installed: many models are deployed there, not in torch.

Both models are exported to ONNX (the same exporter as `save_model(..., "x.onnx")`), loaded
into ONNX Runtime sessions on the same number of threads, and timed like torch models —
interleaved rounds, medians, paired ratios — by wrapping each session in a module.
"""

import importlib.util
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from metaprune.latency.machine import DEFAULT_THREADS
from metaprune.latency.timing import LatencyComparison, compare_latency


def onnxruntime_available() -> bool:
    """Whether the `onnxruntime` package can be imported (it is optional)."""
    return importlib.util.find_spec("onnxruntime") is not None


class _SessionModule(nn.Module):
    """An ONNX Runtime session called like the torch module it was exported from."""

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session
        self.names = [i.name for i in session.get_inputs()]

    def forward(self, *inputs):
        return self.session.run(None, {name: tensor.numpy()
                                       for name, tensor in zip(self.names, inputs)})


def compare_onnxruntime(models: Sequence[nn.Module], example_inputs: Sequence[torch.Tensor], *,
                        batch: int = 1, threads: int = DEFAULT_THREADS, budget_s: float = 4.0,
                        progress: Callable[[str], None] | None = None) -> LatencyComparison:
    """`compare_latency` for the models exported to ONNX and run in ONNX Runtime.

    Raises ImportError without onnxruntime and UnsupportedModelError when export fails.

    Example::

        comparison = compare_onnxruntime([dense, pruned], (torch.randn(1, 3, 32, 32),))
        comparison.median_ms, comparison.speedups[1]
    """
    import onnxruntime

    from metaprune.formats.onnx_export import save_onnx

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    sessions = []
    with tempfile.TemporaryDirectory(prefix="metaprune-ort-") as folder:
        for index, model in enumerate(models):
            if progress is not None:
                progress(f"latency: exporting model {index + 1}/{len(models)} for ONNX Runtime")
            path = Path(folder) / f"model-{index}.onnx"
            save_onnx(model, tuple(example_inputs), path)
            sessions.append(_SessionModule(onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"])))
    return compare_latency(sessions, example_inputs, batch=batch, threads=threads,
                           budget_s=budget_s, progress=progress)
