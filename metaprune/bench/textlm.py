"""Tiny HF LLaMA (next token) and BERT (masked tokens) on an offline corpus: perplexity of the
trained model, after pruning 2x MACs, and after a short recovery, all from `prune`'s report.

The corpus is `metaprune.data.text_corpus` (``sklearn-descr``: scikit-learn's dataset
descriptions, character tokens). Each model is built from a config (never downloaded), trained
briefly with the library's loop (AdamW), then pruned with ``metaprune.prune(speedup=2,
data="sklearn-descr")`` — once without recovery (the "pruned" column) and once with
``--recovery-epochs`` of fine-tuning — under global and uniform allocation. Perplexity is the
report's (held-out 10 %; masked positions only for BERT, the same masks every time). Where the
report says the config can state the pruned widths, the model is written with
``save_pretrained`` and read back with ``from_pretrained`` (local files, no remote code) and its
logits compared. Needs ``transformers``. Writes ``benchmarks/textlm.md``.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

LENGTH = 64  # tokens per window


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="benchmarks/textlm.md", help="the page to write")
    parser.add_argument("--epochs", type=int, default=8,
                        help="training epochs before pruning (38 steps of 32 windows each)")
    parser.add_argument("--recovery-epochs", type=int, default=4,
                        help="fine-tuning epochs after pruning")


def _models(vocab: int):
    """name -> (model, masked, [(allocation, exclude), ...])."""
    import transformers

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
        attn_implementation="eager", use_cache=False))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=vocab + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=LENGTH, attn_implementation="eager"))
    return {
        "LlamaForCausalLM (next token)": (llama, False, [("global", ()), ("uniform", ())]),
        # BertConfig derives the head size from the hidden size: keeping it (the embeddings
        # excluded) lets removed heads be stated as config.pruned_heads
        "BertForMaskedLM (masked tokens)": (bert, True, [
            ("global", ()), ("uniform", ()), ("uniform", ("bert.embeddings",))]),
    }


def _round_trip(model, tokens) -> str:
    """save_pretrained -> from_pretrained: the largest logit difference, or why not."""
    import transformers

    from metaprune import save_model

    with tempfile.TemporaryDirectory() as folder:
        save_model(model, (tokens,), Path(folder) / "pruned")
        auto = getattr(transformers, "AutoModelForMaskedLM"
                       if "MaskedLM" in type(model).__name__ else "AutoModelForCausalLM")
        loaded = auto.from_pretrained(Path(folder) / "pruned", local_files_only=True,
                                      trust_remote_code=False).eval()
        with torch.no_grad():
            gap = (loaded(tokens).logits - model(tokens).logits).abs().max().item()
    return f"from_pretrained, max logit gap {gap:.1e}"


def run(args) -> None:
    from metaprune import prune
    from metaprune.data.text_corpus import CORPUS_ID, load_text_corpus, text_loaders
    from metaprune.finetune import perplexity, train

    torch.set_num_threads(1)
    corpus = load_text_corpus()
    recovery = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0}
    rows = []
    for name, (model, masked, settings) in _models(corpus.vocab_size).items():
        start = time.perf_counter()
        train_loader, test_loader = text_loaders(length=LENGTH, masked=masked)
        train(model, train_loader, epochs=args.epochs, progress=False,
              config={"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0})
        trained = perplexity(model.eval(), test_loader)
        tokens = next(iter(test_loader))[0][:2]
        print(f"{name}: trained perplexity {trained:.2f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
        for allocation, exclude in settings:
            start = time.perf_counter()
            options = dict(speedup=2.0, allocation=allocation, exclude=exclude,
                           data=CORPUS_ID, latency=False)
            pruned = prune(model, (tokens,), **options).report["perplexity_after"]
            result = prune(model, (tokens,), finetune_epochs=args.recovery_epochs,
                           finetune=recovery, **options)
            report = result.report
            note = report["save_pretrained"]
            saved = _round_trip(result.model, tokens) if note["possible"] else \
                f"no: {note['why_not']}"
            rows.append((name, allocation, exclude, report, pruned, saved,
                         time.perf_counter() - start))
            print(f"  {allocation} {list(exclude)}: perplexity {report['perplexity_before']:.2f}"
                  f" -> pruned {pruned:.2f} -> recovered {report['perplexity_after']:.2f} "
                  f"(uniform guess {corpus.vocab_size}); speedup {report['speedup']:.3f}; "
                  f"kept_heads {report['kept_heads']}; {saved}", flush=True)
    _write(args, corpus, rows)


def _write(args, corpus, rows) -> None:
    from metaprune.data.text_corpus import CORPUS_ID

    load = os.getloadavg()[0]
    lines = [
        "# textlm: tiny HF language models on an offline corpus, pruned 2x",
        "",
        f"Command: `{' '.join(['metaprune', 'bench', 'textlm'] + sys.argv[3:])}`. Corpus "
        f"`{CORPUS_ID}` (scikit-learn's dataset descriptions, {corpus.train.numel()} train / "
        f"{corpus.validation.numel()} validation characters, vocabulary {corpus.vocab_size}; "
        f"a uniform guess has that perplexity). {args.epochs} AdamW epochs (lr 3e-3; windows of "
        f"{LENGTH} tokens, batch 32) before pruning; `prune(speedup=2, data=\"{CORPUS_ID}\")` "
        f"(l2) without recovery (\"pruned\") and with {args.recovery_epochs} epochs of AdamW "
        "(lr 1e-3) recovery (\"recovered\"); every perplexity is the report's, on the held-out "
        "10 % (BERT: the masked positions). \"save_pretrained\": the report's `save_pretrained` "
        "and, where possible, the largest logit gap after `from_pretrained`. The machine was "
        f"shared with other jobs (load average {load:.1f}), one torch thread.",
        "",
        "| model | allocation | exclude | trained | pruned 2x | recovered | MACs speed-up "
        "| params before -> after | kept heads | save_pretrained | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, allocation, exclude, report, pruned, saved, seconds in rows:
        heads = ", ".join(f"{v[0]}/{v[1]}" for v in report["kept_heads"].values())
        lines.append(
            f"| {name} | {allocation} | {', '.join(exclude) or '-'} | "
            f"{report['perplexity_before']:.2f} | {pruned:.2f} | "
            f"{report['perplexity_after']:.2f} | {report['speedup']:.3f} | "
            f"{report['params_before']} -> {report['params_after']} | {heads} | {saved} | "
            f"{seconds:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
