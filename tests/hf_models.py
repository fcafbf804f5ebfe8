"""Small real architectures from transformers configs (random weights, nothing downloaded).

Shared by the test files; each factory returns ``(model, example_args)`` with the model in eval mode.
HF initialises norm weights to 1, biases to 0 and BatchNorm statistics to (0, 1): a norm weight or
bias coupled to the wrong channels would not change any output. :func:`randomized` gives them
seeded random values so every coupling test sees such a mistake.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96


def randomized(model: torch.nn.Module, seed: int = 1234) -> torch.nn.Module:
    """Seeded non-trivial values for biases, norm parameters and BatchNorm running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases and norm/scale parameters (1 + 0.5 * N(0, 1) keeps scales away from 0)
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g) if "weight" in name
                        else 0.5 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def _ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _img(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def bert(head: bool = True, layers: int = 2):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32, num_labels=3,
    )
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    return randomized(cls(cfg).eval()), (_ids(),)


def gpt2(head: bool = True, layers: int = 2):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=32, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    cls = transformers.GPT2LMHeadModel if head else transformers.GPT2Model
    return randomized(cls(cfg).eval()), (_ids(),)


def llama(head: bool = True, layers: int = 2, kv_heads: int = 2, use_cache: bool = False):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, intermediate_size=128, max_position_embeddings=32,
        use_cache=use_cache, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    cls = transformers.LlamaForCausalLM if head else transformers.LlamaModel
    return randomized(cls(cfg).eval()), (_ids(),)


def qwen2(layers: int = 1):
    """A Qwen2 causal LM with its default config (``use_cache=True``), as ``from_pretrained`` gives it."""
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return randomized(transformers.Qwen2ForCausalLM(cfg).eval()), (_ids(),)


def vit(head: bool = True, layers: int = 2):
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_labels=3,
    )
    cls = transformers.ViTForImageClassification if head else transformers.ViTModel
    return randomized(cls(cfg).eval()), (_img(),)


def resnet(head: bool = True):
    cfg = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=3,
    )
    cls = transformers.ResNetForImageClassification if head else transformers.ResNetModel
    return randomized(cls(cfg).eval()), (_img(),)


def convnext(head: bool = True):
    cfg = transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3, image_size=32,
    )
    cls = transformers.ConvNextForImageClassification if head else transformers.ConvNextModel
    return randomized(cls(cfg).eval()), (_img(),)


def mobilenet_v2(head: bool = True):
    cfg = transformers.MobileNetV2Config(
        depth_multiplier=0.35, image_size=32, num_labels=3,
    )
    cls = transformers.MobileNetV2ForImageClassification if head else transformers.MobileNetV2Model
    return randomized(cls(cfg).eval()), (_img(),)


FACTORIES = {
    "bert": bert, "gpt2": gpt2, "llama": llama, "vit": vit, "resnet": resnet,
    "convnext": convnext, "mobilenet_v2": mobilenet_v2,
}


def first_tensor(out):
    """The main output tensor of an HF model output (ModelOutput, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = tuple(out.values())
    return out[0]
