"""The architectures of ``benchmarks/coverage.py``: small transformers configs, random weights, offline.

Each entry of :data:`CASES` is ``name -> (family, factory)``; a factory returns ``(model, args,
kwargs)`` with fresh random weights (nothing is downloaded: every model is built from a config).
:func:`build` seeds torch, puts the model in eval mode and gives its biases, norm parameters and
BatchNorm statistics seeded random values (``tests/hf_models.randomized``: HF's 1/0 init would
hide a norm or bias coupled to the wrong channels).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch

logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="transformers")
import transformers as T  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.hf_models import randomized  # noqa: E402

V = 96  # vocabulary size
LM = {"vocab_size": V, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 128, "max_position_embeddings": 64}
TOK = {"use_cache": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
BART = {"vocab_size": V, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
        "max_position_embeddings": 64, "use_cache": False, "pad_token_id": 0, "eos_token_id": 2}
T5 = {"vocab_size": V, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
      "use_cache": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
W2V = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
       "conv_dim": (32, 32), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16,
       "num_conv_pos_embedding_groups": 4, "vocab_size": V}
VIT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
       "image_size": 32, "patch_size": 8}
PYRAMID = {"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [16, 32],
           "num_attention_heads": [1, 2], "patch_sizes": [7, 3], "strides": [4, 2], "mlp_ratios": [2, 2]}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (batch, seq), generator=_gen(seed))  # ids 0-2 are special tokens


def _img(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=_gen(0))


def _wav() -> torch.Tensor:
    return torch.randn(2, 1600, generator=_gen(0))


def lm(cls, cfg):
    return cls(cfg), (_ids(),), {}


def vis(cls, cfg, size: int = 32):
    return cls(cfg), (_img(size),), {}


def encdec(cls, cfg):
    return cls(cfg), (), {"input_ids": _ids(), "decoder_input_ids": _ids(seq=6, seed=1)}


def audio(cls, cfg):
    return cls(cfg), (_wav(),), {}


def _falcon(**kw):
    return T.FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          use_cache=False, bos_token_id=1, eos_token_id=2, **kw)


def _whisper():
    cfg = T.WhisperConfig(vocab_size=V, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, max_source_positions=16, max_target_positions=32,
                          use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None)
    features = torch.randn(2, 16, 32, generator=_gen(0))
    return T.WhisperForConditionalGeneration(cfg), (), {"input_features": features,
                                                         "decoder_input_ids": _ids(seq=6)}


def _clip():
    cfg = T.CLIPConfig(
        text_config={"vocab_size": V, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 128, "max_position_embeddings": 64, "pad_token_id": 0,
                     "bos_token_id": 1, "eos_token_id": 2},
        vision_config=VIT, projection_dim=32)
    return T.CLIPModel(cfg), (), {"input_ids": _ids(), "pixel_values": _img(32)}


def _ast():
    cfg = T.ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      max_length=32, num_mel_bins=32, patch_size=8, frequency_stride=8, time_stride=8,
                      num_labels=3)
    return T.ASTForAudioClassification(cfg), (torch.randn(2, 32, 32, generator=_gen(0)),), {}


def _detr():
    backbone = T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                              layer_type="basic", out_features=["stage4"])
    cfg = T.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                       d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5,
                       num_labels=3)
    return vis(T.DetrForObjectDetection, cfg, 64)


CASES = {
    # ---- decoder-only language models
    "llama": ("decoder", lambda: lm(T.LlamaForCausalLM, T.LlamaConfig(**LM, num_key_value_heads=2, **TOK))),
    "llama_tied": ("decoder", lambda: lm(T.LlamaForCausalLM, T.LlamaConfig(
        **LM, num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, **TOK))),
    "mistral": ("decoder", lambda: lm(T.MistralForCausalLM, T.MistralConfig(**LM, num_key_value_heads=2, **TOK))),
    "qwen2": ("decoder", lambda: lm(T.Qwen2ForCausalLM, T.Qwen2Config(**LM, num_key_value_heads=2, **TOK))),
    "qwen3": ("decoder", lambda: lm(T.Qwen3ForCausalLM, T.Qwen3Config(**LM, num_key_value_heads=2, head_dim=16,
                                                                       **TOK))),
    "gemma2": ("decoder", lambda: lm(T.Gemma2ForCausalLM, T.Gemma2Config(
        **LM, num_key_value_heads=2, head_dim=16, sliding_window=4, **TOK))),
    "gemma3_text": ("decoder", lambda: lm(T.Gemma3ForCausalLM, T.Gemma3TextConfig(
        **LM, num_key_value_heads=2, head_dim=16, sliding_window=4, **TOK))),
    "phi": ("decoder", lambda: lm(T.PhiForCausalLM, T.PhiConfig(**LM, partial_rotary_factor=0.5, **TOK))),
    "phi3": ("decoder", lambda: lm(T.Phi3ForCausalLM, T.Phi3Config(**LM, num_key_value_heads=2, **TOK))),
    "falcon": ("decoder", lambda: lm(T.FalconForCausalLM, _falcon())),
    "falcon_new": ("decoder", lambda: lm(T.FalconForCausalLM, _falcon(num_kv_heads=2,
                                                                        new_decoder_architecture=True))),
    "falcon_alibi": ("decoder", lambda: lm(T.FalconForCausalLM, _falcon(alibi=True))),
    "gptj": ("decoder", lambda: lm(T.GPTJForCausalLM, T.GPTJConfig(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, use_cache=False,
        bos_token_id=1, eos_token_id=2))),
    "gpt2": ("decoder", lambda: lm(T.GPT2LMHeadModel, T.GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False, bos_token_id=1,
        eos_token_id=2))),
    "gpt2_upcast": ("decoder", lambda: lm(T.GPT2LMHeadModel, T.GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, reorder_and_upcast_attn=True,
        scale_attn_by_inverse_layer_idx=True, use_cache=False, bos_token_id=1, eos_token_id=2))),
    "gpt_neo": ("decoder", lambda: lm(T.GPTNeoForCausalLM, T.GPTNeoConfig(
        vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=4, max_position_embeddings=64, use_cache=False, bos_token_id=1, eos_token_id=2))),
    "gpt_bigcode": ("decoder", lambda: lm(T.GPTBigCodeForCausalLM, T.GPTBigCodeConfig(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=True, use_cache=False,
        bos_token_id=1, eos_token_id=2))),
    "gpt_neox": ("decoder", lambda: lm(T.GPTNeoXForCausalLM, T.GPTNeoXConfig(**LM, use_cache=False,
                                                                               bos_token_id=1, eos_token_id=2))),
    "codegen": ("decoder", lambda: lm(T.CodeGenForCausalLM, T.CodeGenConfig(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, n_ctx=64, use_cache=False,
        bos_token_id=1, eos_token_id=2))),
    "mpt": ("decoder", lambda: lm(T.MptForCausalLM, T.MptConfig(
        vocab_size=V, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64, use_cache=False))),
    "opt": ("decoder", lambda: lm(T.OPTForCausalLM, T.OPTConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        max_position_embeddings=64, word_embed_proj_dim=64, **TOK))),
    "xglm": ("decoder", lambda: lm(T.XGLMForCausalLM, T.XGLMConfig(
        vocab_size=V, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, max_position_embeddings=64,
        **TOK))),
    "biogpt": ("decoder", lambda: lm(T.BioGptForCausalLM, T.BioGptConfig(**LM, **TOK))),
    "bloom": ("decoder", lambda: lm(T.BloomForCausalLM, T.BloomConfig(
        vocab_size=V, hidden_size=64, n_layer=2, n_head=4, **TOK))),
    "stablelm": ("decoder", lambda: lm(T.StableLmForCausalLM, T.StableLmConfig(
        **LM, num_key_value_heads=2, partial_rotary_factor=0.25, **TOK))),
    "persimmon": ("decoder", lambda: lm(T.PersimmonForCausalLM, T.PersimmonConfig(**LM, **TOK))),
    "olmo": ("decoder", lambda: lm(T.OlmoForCausalLM, T.OlmoConfig(**LM, **TOK))),
    "olmo2": ("decoder", lambda: lm(T.Olmo2ForCausalLM, T.Olmo2Config(**LM, **TOK))),
    "granite": ("decoder", lambda: lm(T.GraniteForCausalLM, T.GraniteConfig(**LM, num_key_value_heads=2, **TOK))),
    "starcoder2": ("decoder", lambda: lm(T.Starcoder2ForCausalLM, T.Starcoder2Config(**LM, num_key_value_heads=2,
                                                                                      **TOK))),
    "cohere": ("decoder", lambda: lm(T.CohereForCausalLM, T.CohereConfig(**LM, num_key_value_heads=2, **TOK))),
    "nemotron": ("decoder", lambda: lm(T.NemotronForCausalLM, T.NemotronConfig(**LM, num_key_value_heads=2,
                                                                                **TOK))),
    "glm": ("decoder", lambda: lm(T.GlmForCausalLM, T.GlmConfig(**LM, num_key_value_heads=2, head_dim=16, **TOK))),
    "smollm3": ("decoder", lambda: lm(T.SmolLM3ForCausalLM, T.SmolLM3Config(**LM, num_key_value_heads=2, **TOK))),
    # ---- mixture of experts
    "mixtral": ("moe", lambda: lm(T.MixtralForCausalLM, T.MixtralConfig(
        **LM, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **TOK))),
    "qwen2_moe": ("moe", lambda: lm(T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(
        **LM, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, **TOK))),
    "qwen3_moe": ("moe", lambda: lm(T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(
        **LM, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        **TOK))),
    "olmoe": ("moe", lambda: lm(T.OlmoeForCausalLM, T.OlmoeConfig(**LM, num_experts=4, num_experts_per_tok=2,
                                                                   **TOK))),
    "granitemoe": ("moe", lambda: lm(T.GraniteMoeForCausalLM, T.GraniteMoeConfig(
        **LM, num_local_experts=4, num_experts_per_tok=2, **TOK))),
    "deepseek_v3": ("moe", lambda: lm(T.DeepseekV3ForCausalLM, T.DeepseekV3Config(
        **LM, num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **TOK))),
    "gpt_oss": ("moe", lambda: lm(T.GptOssForCausalLM, T.GptOssConfig(
        **LM, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        **TOK))),
    # ---- encoders (text)
    "bert_bare": ("encoder", lambda: lm(T.BertModel, T.BertConfig(**LM))),
    "bert_cls": ("encoder", lambda: lm(T.BertForSequenceClassification, T.BertConfig(**LM, num_labels=3))),
    "bert_relkey": ("encoder", lambda: lm(T.BertForSequenceClassification, T.BertConfig(
        **LM, num_labels=3, position_embedding_type="relative_key_query"))),
    "roberta": ("encoder", lambda: lm(T.RobertaForSequenceClassification, T.RobertaConfig(**LM, pad_token_id=1))),
    "xlm_roberta": ("encoder", lambda: lm(T.XLMRobertaForMaskedLM, T.XLMRobertaConfig(**LM, pad_token_id=1))),
    "deberta": ("encoder", lambda: lm(T.DebertaForSequenceClassification, T.DebertaConfig(
        **LM, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=32, num_labels=3))),
    "deberta_v2": ("encoder", lambda: lm(T.DebertaV2ForSequenceClassification, T.DebertaV2Config(
        **LM, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
        max_relative_positions=32, num_labels=3))),
    "albert": ("encoder", lambda: lm(T.AlbertForSequenceClassification, T.AlbertConfig(
        **LM, embedding_size=32, num_labels=3))),
    "electra": ("encoder", lambda: lm(T.ElectraForSequenceClassification, T.ElectraConfig(
        **LM, embedding_size=32))),
    "mpnet": ("encoder", lambda: lm(T.MPNetForSequenceClassification, T.MPNetConfig(**LM, num_labels=3))),
    "distilbert": ("encoder", lambda: lm(T.DistilBertForSequenceClassification, T.DistilBertConfig(
        vocab_size=V, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64,
        pad_token_id=0))),
    "modernbert": ("encoder", lambda: lm(T.ModernBertForSequenceClassification, T.ModernBertConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, local_attention=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2, num_labels=3))),
    "squeezebert": ("encoder", lambda: lm(T.SqueezeBertForSequenceClassification, T.SqueezeBertConfig(
        **LM, embedding_size=64, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
        intermediate_groups=4, output_groups=4, num_labels=3))),
    "mobilebert": ("encoder", lambda: lm(T.MobileBertForSequenceClassification, T.MobileBertConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        embedding_size=32, intra_bottleneck_size=32, max_position_embeddings=64, num_feedforward_networks=2,
        num_labels=3))),
    "funnel": ("encoder", lambda: lm(T.FunnelForSequenceClassification, T.FunnelConfig(
        vocab_size=V, block_sizes=[1, 1], d_model=64, n_head=4, d_head=16, d_inner=128, num_labels=3))),
    "convbert": ("encoder", lambda: lm(T.ConvBertForSequenceClassification, T.ConvBertConfig(
        **LM, embedding_size=64, head_ratio=2, conv_kernel_size=3, num_groups=1, num_labels=3))),
    "clip_text": ("encoder", lambda: lm(T.CLIPTextModel, T.CLIPTextConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))),
    # ---- encoder-decoder
    "bart": ("encoder-decoder", lambda: encdec(T.BartForConditionalGeneration, T.BartConfig(
        **BART, bos_token_id=1, decoder_start_token_id=2))),
    "mbart": ("encoder-decoder", lambda: encdec(T.MBartForConditionalGeneration, T.MBartConfig(
        **BART, bos_token_id=1, decoder_start_token_id=2))),
    "marian": ("encoder-decoder", lambda: encdec(T.MarianMTModel, T.MarianConfig(**BART,
                                                                                  decoder_start_token_id=0))),
    "pegasus": ("encoder-decoder", lambda: encdec(T.PegasusForConditionalGeneration, T.PegasusConfig(
        **BART, decoder_start_token_id=0))),
    "t5": ("encoder-decoder", lambda: encdec(T.T5ForConditionalGeneration, T.T5Config(**T5))),
    "t5_v1_1": ("encoder-decoder", lambda: encdec(T.T5ForConditionalGeneration, T.T5Config(
        **T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False))),
    "whisper": ("encoder-decoder", _whisper),
    # ---- audio
    "wav2vec2": ("audio", lambda: audio(T.Wav2Vec2Model, T.Wav2Vec2Config(**W2V))),
    "wav2vec2_ln": ("audio", lambda: audio(T.Wav2Vec2Model, T.Wav2Vec2Config(
        **W2V, feat_extract_norm="layer", do_stable_layer_norm=True))),
    "hubert": ("audio", lambda: audio(T.HubertModel, T.HubertConfig(**W2V))),
    "w2v2_conformer": ("audio", lambda: audio(T.Wav2Vec2ConformerModel, T.Wav2Vec2ConformerConfig(
        **W2V, conv_depthwise_kernel_size=3, position_embeddings_type="rotary"))),
    "ast": ("audio", _ast),
    # ---- vision transformers
    "vit": ("vision", lambda: vis(T.ViTForImageClassification, T.ViTConfig(**VIT, num_labels=3))),
    "deit": ("vision", lambda: vis(T.DeiTForImageClassificationWithTeacher, T.DeiTConfig(**VIT, num_labels=3))),
    "beit": ("vision", lambda: vis(T.BeitForImageClassification, T.BeitConfig(
        **VIT, num_labels=3, use_relative_position_bias=True, layer_scale_init_value=0.1, use_mean_pooling=True))),
    "data2vec_vision": ("vision", lambda: vis(T.Data2VecVisionForImageClassification, T.Data2VecVisionConfig(
        **VIT, use_relative_position_bias=True, num_labels=3))),
    "dinov2": ("vision", lambda: vis(T.Dinov2Model, T.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8))),
    "clip_vision": ("vision", lambda: vis(T.CLIPVisionModel, T.CLIPVisionConfig(**VIT))),
    "siglip_vision": ("vision", lambda: vis(T.SiglipVisionModel, T.SiglipVisionConfig(**VIT))),
    "yolos": ("vision", lambda: vis(T.YolosForObjectDetection, T.YolosConfig(
        **{**VIT, "image_size": [32, 32]}, num_detection_tokens=4, num_labels=3))),
    "dpt": ("vision", lambda: vis(T.DPTForDepthEstimation, T.DPTConfig(
        **{**VIT, "num_hidden_layers": 4}, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=32, head_hidden_size=16))),
    "swin": ("vision", lambda: vis(T.SwinForImageClassification, T.SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
        num_labels=3), 64)),
    "swinv2": ("vision", lambda: vis(T.Swinv2ForImageClassification, T.Swinv2Config(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
        num_labels=3), 64)),
    "segformer": ("vision", lambda: vis(T.SegformerForSemanticSegmentation, T.SegformerConfig(
        **PYRAMID, decoder_hidden_size=32, num_labels=3), 64)),
    "pvt_v2": ("vision", lambda: vis(T.PvtV2ForImageClassification, T.PvtV2Config(
        image_size=64, **PYRAMID, num_labels=3), 64)),
    "levit": ("vision", lambda: vis(T.LevitForImageClassification, T.LevitConfig(
        image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
        key_dim=[8, 8, 8], num_labels=3), 64)),
    "mobilevit": ("vision", lambda: vis(T.MobileViTForImageClassification, T.MobileViTConfig(
        image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[16, 16, 24, 24, 32, 32, 64],
        num_labels=3), 64)),
    "detr": ("vision", _detr),
    # ---- convolutional vision
    "resnet": ("convnet", lambda: vis(T.ResNetForImageClassification, T.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=3))),
    "resnet_basic": ("convnet", lambda: vis(T.ResNetForImageClassification, T.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[2, 1], layer_type="basic", num_labels=3))),
    "convnext": ("convnet", lambda: vis(T.ConvNextForImageClassification, T.ConvNextConfig(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3))),
    "convnextv2": ("convnet", lambda: vis(T.ConvNextV2ForImageClassification, T.ConvNextV2Config(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3))),
    "regnet": ("convnet", lambda: vis(T.RegNetForImageClassification, T.RegNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=3), 64)),
    "bit": ("convnet", lambda: vis(T.BitForImageClassification, T.BitConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_groups=4,
        num_labels=3), 64)),
    "efficientnet": ("convnet", lambda: vis(T.EfficientNetForImageClassification, T.EfficientNetConfig(
        image_size=64, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320, num_labels=3), 64)),
    "mobilenet_v1": ("convnet", lambda: vis(T.MobileNetV1ForImageClassification, T.MobileNetV1Config(
        depth_multiplier=0.25, image_size=32, num_labels=3))),
    "mobilenet_v2": ("convnet", lambda: vis(T.MobileNetV2ForImageClassification, T.MobileNetV2Config(
        depth_multiplier=0.35, image_size=32, num_labels=3))),
    "poolformer": ("convnet", lambda: vis(T.PoolFormerForImageClassification, T.PoolFormerConfig(
        num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
        padding=[2, 1], num_labels=3), 64)),
    "focalnet": ("convnet", lambda: vis(T.FocalNetForImageClassification, T.FocalNetConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], focal_levels=[2, 2], focal_windows=[3, 3],
        num_labels=3), 64)),
    # ---- multimodal
    "clip_full": ("multimodal", _clip),
}

#: ``--quick``: one or two of each family
QUICK = ("llama", "mixtral", "gpt2", "bert_cls", "t5", "falcon", "vit", "resnet", "convnext", "whisper")


def build(name: str):
    """``(family, model, args, kwargs)`` for one case, with seeded random weights and parameters."""
    family, factory = CASES[name]
    torch.manual_seed(0)
    model, args, kwargs = factory()
    return family, randomized(model.eval()), args, kwargs
