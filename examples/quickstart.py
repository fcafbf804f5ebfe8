"""nmgraph quickstart: a small HF BERT (random weights, built from a config) made 2:4 sparse.

Run with ``make demo``. Steps: capture the model as an FX graph, compute a 2:4 mask for every
Linear weight, and print per-layer kept magnitude and storage.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

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
    for noisy in ("transformers", "torch.onnx", "onnxscript", "torch._dynamo", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    pattern = nmgraph.Pattern.parse("2:4")
    model, args = build_model()
    with torch.no_grad():
        reference = model(*args).logits

    # 1. Capture
    gm = nmgraph.capture(model, args)
    print(f"captured {type(model).__name__}: {len(gm.graph.nodes)} nodes "
          f"(via {nmgraph.graph_record(gm).captured_by})\n")

    # 2. Analysis: eligible weights, weights left dense (with reasons), permutation groups
    plan = nmgraph.analyze(gm, pattern)
    print(plan, "\n")

    # 3. Permutation: kept magnitude with identity, a random and a searched channel order
    report = nmgraph.permute(gm, plan, search="random", seed=0)
    random_kept = dict(report.kept_after)
    nmgraph.permute(gm, plan, perms={g: torch.argsort(p) for g, p in report.perms.items()})  # undo
    searched = nmgraph.permute(gm, plan, search="greedy", seed=0, time_limit=20)
    print(f"{'layer':<52} {'identity':>9} {'random':>9} {'greedy':>9}")
    for info in plan.layers:
        print(f"{info.name:<52} {100 * searched.kept_before[info.name]:>8.2f}% "
              f"{100 * random_kept[info.name]:>8.2f}% {100 * searched.kept_after[info.name]:>8.2f}%")
    with torch.no_grad():
        err = (model(*args).logits - reference).abs().max().item()
    print(f"output change after permuting {len(searched.permuted)} groups: {err:.2e} (verified)\n")

    # 4. Storage of the 2:4 weights
    print(f"{'layer':<52} {'shape':<12} {'kept |w| %':>10} {'dense B':>9} {'2:4 B':>9}")
    total_dense = total_sparse = 0
    for info in plan.layers:
        w = gm.get_parameter(info.name).detach().half()
        mask = nmgraph.nm_mask(w, pattern, axis=info.axis)
        kept = (w.float().abs() * mask).sum() / w.float().abs().sum()
        c = nmgraph.compress(w * mask, pattern, axis=info.axis)
        total_dense += c.dense_nbytes
        total_sparse += c.nbytes
        shape = "x".join(map(str, w.shape))
        print(f"{info.name:<52} {shape:<12} {100 * kept:>9.1f}% {c.dense_nbytes:>9} {c.nbytes:>9}")
    print(f"\neligible weights (fp16): {total_dense} B dense -> {total_sparse} B as 2:4 "
          f"({total_sparse / total_dense:.4f} of dense)\n")

    # 5. Fold: prune every eligible weight to exactly 2:4 (magnitude, after the permutation)
    inference = nmgraph.convert(gm, pattern, plan=plan)
    assert all(nmgraph.is_nm(gm.get_parameter(i.name), pattern, axis=i.axis) for i in plan.layers)
    with torch.no_grad():
        pruned = inference(*args).logits
    print(f"converted: {len(plan.layers)} weights exactly {pattern}; logits moved by "
          f"{(pruned - reference).abs().max().item():.3f} from the dense model (one-shot pruning, no "
          "fine-tuning)\n")

    # 6. Deploy: per-layer backend choice, measured on this device
    fast = nmgraph.compile(model, pattern)
    with torch.no_grad():
        out = fast(*args).logits
    print(f"nmgraph.compile: max difference to the pruned graph {(out - pruned).abs().max().item():.1e}")
    lowering = next(iter(fast.report.lowerings.values()))
    print(f"  {len(lowering.changed_nodes)} GEMMs on sparse kernels, {len(lowering.skipped)} kept dense; "
          f"first reason: {lowering.skipped[0].reason if lowering.skipped else '-'}")
    runs = next(iter(fast.report.runs.values()))
    what = {"model": "the model's own forward (nothing lowered)", "graph": "the lowered graph",
            "inductor": "the lowered graph compiled by inductor"}[runs]
    print(f"  calls run {what}\n")

    # 7. Export: ONNX, verified with onnxruntime, checked for the pattern TensorRT reads
    with tempfile.TemporaryDirectory() as tmp:
        report = nmgraph.export(model, Path(tmp) / "bert.onnx", args, pattern, plan=plan)
    print(report)


if __name__ == "__main__":
    main()
