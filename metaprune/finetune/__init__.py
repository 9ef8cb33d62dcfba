"""Training and fine-tuning: the loop, evaluation, BatchNorm recalibration, distillation.

The pruning engine fine-tunes pruned networks with :func:`train`; the corpus builder trains the
zoo's models with it; the service and Ray Tune follow its progress through ``on_epoch``.

Example::

    from metaprune.data import load_dataset
    from metaprune.finetune import FinetuneConfig, evaluate, train
    train_loader, test_loader = load_dataset("mnist1d").loaders(batch_size=128)
    history = train(model, train_loader, epochs=10, eval_loader=test_loader,
                    config=FinetuneConfig.from_dict({"optimizer": "adamw"}))
    evaluate(model, test_loader)
"""

from metaprune.finetune.batchnorm import recalibrate_batchnorm
from metaprune.finetune.config import FinetuneConfig
from metaprune.finetune.distill import distillation_loss
from metaprune.finetune.loop import evaluate, perplexity, train

__all__ = ["FinetuneConfig", "distillation_loss", "evaluate", "perplexity", "recalibrate_batchnorm",
           "train"]
