"""Bytes on disk of a bf16 2:4 Llama: dense-stored HF directory vs nmgraph's compressed form.

Builds Llama configs with random weights (nothing downloaded), prunes every decoder Linear to 2:4
by magnitude (the lm_head and embeddings stay dense, as nmgraph.sparsify leaves them), writes both
forms with nmgraph.save_pretrained and prints the safetensors bytes of each and their ratio.

    python benchmarks/hf_size.py            # 7B-like shares (96 % of parameters in N:M weights) and a
                                            # large-vocabulary variant
    python benchmarks/hf_size.py --quick    # a small model, for a smoke run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import nmgraph


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(vocab: int, hidden: int, intermediate: int, layers: int) -> dict:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                   num_key_value_heads=max(1, hidden // 64))
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.mul_(nmgraph.nm_mask(mod.weight, "2:4"))
    with tempfile.TemporaryDirectory() as tmp:
        dense = nmgraph.save_pretrained(model, Path(tmp) / "dense")
        packed = nmgraph.save_pretrained(model, Path(tmp) / "packed", compressed=True)
        dense_bytes, packed_bytes = _bytes(Path(tmp) / "dense"), _bytes(Path(tmp) / "packed")
    total = sum(p.numel() for p in model.parameters())
    nm = sum(model.get_parameter(n).numel() for n in packed.weights)
    return {"vocab": vocab, "params": total, "nm_share": nm / total, "dense_bytes": dense_bytes,
            "compressed_bytes": packed_bytes, "ratio": packed_bytes / dense_bytes,
            "nm_weights": len(dense.weights)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    shapes = [(2000, 256, 688, 2)] if a.quick else [(2000, 1024, 2752, 8), (32000, 1024, 2752, 8)]
    for shape in shapes:
        r = measure(*shape)
        print(f"vocab {r['vocab']}: {r['params'] / 1e6:.1f}M parameters, {r['nm_share']:.1%} in {r['nm_weights']} "
              f"2:4 weights; bf16 safetensors dense {r['dense_bytes'] / 1e6:.1f} MB, compressed "
              f"{r['compressed_bytes'] / 1e6:.1f} MB: {r['ratio']:.4f} of dense")


if __name__ == "__main__":
    main()
