"""BatchNorm recalibration: re-estimate running statistics after the weights changed.

Pruning removes channels and rewrites weights, so the running mean/variance a BatchNorm layer
kept during training no longer describe what reaches it; evaluating with them loses accuracy
that a few forward passes recover without any gradient step.
"""

import torch
from torch import nn
from torch.utils.data import DataLoader

from metaprune.finetune.device import model_device

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, *, batches: int = 50) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them on ``batches`` batches.

    Only the BatchNorm layers run in training mode (dropout and the rest stay in eval mode, so
    they do not disturb the statistics); ``momentum=None`` makes the estimate the cumulative
    average over all batches seen rather than an exponential one. The model's modes and the
    layers' momenta are restored afterwards. Returns the number of batches used (0 when the
    model has no BatchNorm, which is then left untouched).

    Example::

        pruned = prune(model, example_inputs, speedup=2.0).model
        recalibrate_batchnorm(pruned, train_loader, batches=20)
    """
    if batches < 1:
        raise ValueError(f"batches must be positive, got {batches}")
    norms = [module for module in model.modules() if isinstance(module, _BATCHNORM)]
    if not norms or not any(norm.track_running_stats for norm in norms):
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    device = model_device(model)
    used = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for inputs, _ in loader:
            model(inputs.to(device))
            used += 1
            if used == batches:
                break
    finally:
        for module, training in modes.items():
            module.train(training)
        for norm, momentum in momenta.items():
            norm.momentum = momentum
    return used

