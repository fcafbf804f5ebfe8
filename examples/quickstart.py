"""nmgraph quickstart: a small HF BERT (random weights, built from a config) made 2:4 sparse.

Run with ``make demo``. Steps: capture the model as an FX graph, compute a 2:4 mask for every
Linear weight, and print per-layer kept magnitude and storage.
"""

from __future__ import annotations

import logging

import torch

import nmgraph


def build_model():
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=64, num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval(), (torch.randint(0, 1000, (2, 16)),)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    pattern = nmgraph.Pattern.parse("2:4")
    model, args = build_model()
    gm = nmgraph.capture(model, args)
    print(f"captured {type(model).__name__}: {len(gm.graph.nodes)} nodes "
          f"(via {gm.meta['nmgraph_capture']})\n")

    print(f"{'layer':<45} {'shape':<12} {'kept |w| %':>10} {'dense B':>9} {'2:4 B':>9}")
    total_dense = total_sparse = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.weight.detach().half()
        mask = nmgraph.nm_mask(w, pattern)
        kept = (w.float().abs() * mask).sum() / w.float().abs().sum()
        c = nmgraph.compress(w * mask, pattern)
        total_dense += c.dense_nbytes
        total_sparse += c.nbytes
        shape = "x".join(map(str, w.shape))
        print(f"{name:<45} {shape:<12} {100 * kept:>9.1f}% {c.dense_nbytes:>9} {c.nbytes:>9}")
    print(f"\nLinear weights (fp16): {total_dense} B dense -> {total_sparse} B as 2:4 "
          f"({total_sparse / total_dense:.4f} of dense)")


if __name__ == "__main__":
    main()
