"""Small models for the one-shot tests: HF configs with random weights (nothing downloaded) and a CNN."""

from __future__ import annotations

import torch
from torch import nn

from tests import hf_models

transformers = hf_models.transformers
VOCAB = hf_models.VOCAB


def tokens(count: int, length: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """``count`` 1-D token sequences (calibration samples)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (length,), generator=g) for _ in range(count)]


def llama(layers: int = 2, hidden: int = 64):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # use_cache left at its default (True): sparsify must cope
    return hf_models.randomized(transformers.LlamaForCausalLM(cfg).eval())


def qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return hf_models.randomized(transformers.Qwen2ForCausalLM(cfg).eval())


def qwen2_moe():
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=0,
        eos_token_id=0,
    )
    return hf_models.randomized(transformers.Qwen2MoeForCausalLM(cfg).eval())


def gpt2():
    return hf_models.gpt2()[0]


def bert():
    return hf_models.bert()[0]


class CNN(nn.Module):
    """Convs with stride, padding, dilation and groups, BatchNorm, and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2, groups=2)
        self.point = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.point(x)).mean((2, 3))
        return self.head(torch.relu(self.fc(x)))


def cnn():
    torch.manual_seed(0)
    return hf_models.randomized(CNN().eval())


def images(count: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 16, 16, generator=g) for _ in range((count + 1) // 2)]
