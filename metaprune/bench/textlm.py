"""Tiny HF LLaMA (next token) and BERT (masked tokens) on an offline corpus: perplexity of the
trained model, after pruning 2x MACs, and after a short recovery.

The corpus is `metaprune.data.text_corpus` (``sklearn-descr``: scikit-learn's dataset
descriptions, character tokens). Each model is built from a config (never downloaded), trained
briefly with AdamW, pruned with `metaprune.prune(speedup=2)` (l2, global allocation) and
fine-tuned for a few steps (uniform allocation when global's coarse steps miss 2x); perplexity is measured on the held-out 10 % (masked positions only
for BERT, the same masks for every measurement). Needs ``transformers``. Writes
``benchmarks/textlm.md``.
"""

import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

MASK_FRACTION = 0.15


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="benchmarks/textlm.md", help="the page to write")
    parser.add_argument("--steps", type=int, default=300, help="training steps before pruning")
    parser.add_argument("--recovery-steps", type=int, default=150,
                        help="fine-tuning steps after pruning")


def _models(vocab: int):
    import transformers

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager", use_cache=False))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=vocab + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager"))
    return {"LlamaForCausalLM (next token)": (llama, False),
            "BertForMaskedLM (masked tokens)": (bert, True)}


def _masked(inputs, mask_id, generator):
    """Inputs with MASK_FRACTION of positions replaced by the mask token; targets -100 elsewhere."""
    chosen = torch.rand(inputs.shape, generator=generator) < MASK_FRACTION
    targets = torch.where(chosen, inputs, torch.full_like(inputs, -100))
    return torch.where(chosen, torch.full_like(inputs, mask_id), inputs), targets


def _loss(model, inputs, targets, masked):
    logits = model(inputs).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100)


def _batch(corpus, masked, generator, length):
    inputs, following = corpus.batch("train", batch=32, length=length, generator=generator)
    if masked:
        return _masked(inputs, corpus.vocab_size, generator)
    return inputs, following


def _train(model, corpus, masked, steps, lr, seed, length=64):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        inputs, targets = _batch(corpus, masked, generator, length)
        loss = _loss(model, inputs, targets, masked)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def _perplexity(model, corpus, masked, length=64):
    windows = corpus.windows("validation", length=length + 1)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if masked:
        inputs, targets = _masked(windows[:, :-1], corpus.vocab_size,
                                  torch.Generator().manual_seed(1))
    model.eval()
    return math.exp(float(_loss(model, inputs, targets, masked)))


def run(args) -> None:
    from metaprune import prune
    from metaprune.errors import InvalidTargetError
    from metaprune.data.text_corpus import CORPUS_ID, load_text_corpus

    torch.set_num_threads(1)
    corpus = load_text_corpus()
    rows = []
    for name, (model, masked) in _models(corpus.vocab_size).items():
        start = time.perf_counter()
        _train(model, corpus, masked, args.steps, 3e-3, seed=0)
        trained = _perplexity(model, corpus, masked)
        example = (corpus.windows("train", length=64)[:2],)
        try:
            result = prune(model, example, speedup=2.0, latency=False)
        except InvalidTargetError as error:  # a coarse step (a whole key-value head group)
            print(f"{name}: global allocation: {error}; uniform instead", flush=True)
            result = prune(model, example, speedup=2.0, allocation="uniform", latency=False)
        pruned = result.model
        after_prune = _perplexity(pruned, corpus, masked)
        _train(pruned, corpus, masked, args.recovery_steps, 1e-3, seed=1)
        recovered = _perplexity(pruned, corpus, masked)
        rows.append((name, trained, after_prune, recovered, result.report,
                     time.perf_counter() - start))
        print(f"{name}: perplexity {trained:.2f} -> pruned {after_prune:.2f} -> recovered "
              f"{recovered:.2f} (uniform guess {corpus.vocab_size}); speedup "
              f"{result.report['speedup']:.3f}; kept_heads {result.report['kept_heads']}",
              flush=True)
    load = os.getloadavg()[0]
    lines = [
        "# textlm: tiny HF language models on an offline corpus, pruned 2x",
        "",
        f"Command: `{' '.join(['metaprune', 'bench', 'textlm'] + sys.argv[3:])}`. Corpus "
        f"`{CORPUS_ID}` (scikit-learn's dataset descriptions, {corpus.train.numel()} train / "
        f"{corpus.validation.numel()} validation characters, vocabulary {corpus.vocab_size}; "
        "a uniform guess has that perplexity). "
        f"{args.steps} AdamW steps (batch 32 x 64 tokens) before pruning, prune to 2x MACs "
        "(l2; global allocation, or uniform where global's steps cannot reach 2x within 2 %: "
        f"the allocation column), {args.recovery_steps} steps after. Perplexity on the held-out 10 %. "
        f"The machine was shared with other jobs (load average {load:.1f}), one torch thread.",
        "",
        "| model | trained | pruned 2x | recovered | MACs speed-up | allocation "
        "| params before -> after | kept heads | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, trained, after_prune, recovered, report, seconds in rows:
        heads = ", ".join(f"`{k}` {v[0]}/{v[1]}" for k, v in report["kept_heads"].items())
        lines.append(f"| {name} | {trained:.2f} | {after_prune:.2f} | {recovered:.2f} | "
                     f"{report['speedup']:.3f} | {report['allocation']} | "
                     f"{report['params_before']} -> "
                     f"{report['params_after']} | {heads} | {seconds:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
