"""Tiny random Hugging Face models of every family, with the awkward settings turned on.

Test-only (imports torch and transformers). Each config exercises something a preset
would not: GQA ratios of 3, head_dim != dim / heads, Llama 3 RoPE scaling, soft-caps that
actually bite, sliding windows shorter than the test sequences, and random (non-identity)
norm weights, since HF initialises Gemma's norms to zero.
"""
import json
import pathlib

import torch
import transformers

COMMON = dict(vocab_size=300, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=24, intermediate_size=160, max_position_embeddings=512,
              rms_norm_eps=1e-5)

HF_CONFIGS = {
    "llama3": ("LlamaConfig", dict(COMMON, tie_word_embeddings=False, rope_theta=50_000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", dict(COMMON, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", dict(COMMON, tie_word_embeddings=False, rope_theta=1e6)),
    "gemma": ("GemmaConfig", dict(COMMON, num_key_value_heads=3, head_dim=20)),
    "gemma2": ("Gemma2Config", dict(COMMON, num_hidden_layers=4, sliding_window=16, query_pre_attn_scalar=32,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(COMMON, num_hidden_layers=4, sliding_window=16, sliding_window_pattern=2,
                                        query_pre_attn_scalar=20, rope_theta=1e6, rope_local_base_freq=100.0,
                                        rope_scaling={"rope_type": "linear", "factor": 4.0})),
}
FAMILIES = list(HF_CONFIGS)


def make_hf_model(family: str, seed: int = 0, **overrides):
    cls, kw = HF_CONFIGS[family]
    config = getattr(transformers, cls)(**{**kw, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # non-identity norms in both conventions (w and 1 + w)
                p.uniform_(-0.5, 0.5)
                if not gemma:
                    p.add_(1.0)
            else:
                p.normal_(0.0, 0.08)
    return model


def save_hf_model(model, path) -> pathlib.Path:
    path = pathlib.Path(path)
    model.save_pretrained(path)
    return path


def to_classic_config(path: pathlib.Path) -> None:
    """Rewrite a transformers-5 config.json in the hub's classic field names."""
    file = path / "config.json"
    cfg = json.loads(file.read_text())
    rope = cfg.pop("rope_parameters")
    if "full_attention" in rope:  # Gemma 3: per layer type
        local = rope.pop("sliding_attention")
        rope = rope["full_attention"]
        cfg["rope_local_base_freq"] = local["rope_theta"]
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {("type" if rope["rope_type"] == "linear" else "rope_type"): rope.pop("rope_type"), **rope}
    if cfg["model_type"] == "gemma3_text":
        layer_types = cfg.pop("layer_types")
        cfg["sliding_window_pattern"] = layer_types.index("full_attention") + 1
        cfg.pop("_sliding_window_pattern", None)
    elif cfg["model_type"] == "gemma2":
        cfg.pop("layer_types")
    file.write_text(json.dumps(cfg, indent=2))


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


# Qwen 3 MoE (tests/test_moe.py), not in FAMILIES: router softmax over 6 experts, top-k, each flavour of layer
# mix transformers knows (decoder_sparse_step, mlp_only_layers, sparse everywhere), norm_topk_prob both ways.
_MOE = dict(COMMON, tie_word_embeddings=False, rope_theta=1e6, num_experts=6, moe_intermediate_size=48)
HF_CONFIGS.update({
    "qwen3_moe": ("Qwen3MoeConfig", dict(_MOE, num_hidden_layers=4, decoder_sparse_step=2, norm_topk_prob=True,
                                         num_experts_per_tok=2)),  # layers 1, 3 sparse
    "qwen3_moe_unnormed": ("Qwen3MoeConfig", dict(_MOE, mlp_only_layers=[0], norm_topk_prob=False,
                                                  num_experts_per_tok=3)),  # layers 1, 2 sparse
    "qwen3_moe_all_sparse": ("Qwen3MoeConfig", dict(_MOE, norm_topk_prob=True, num_experts_per_tok=2)),
})
MOE_VARIANTS = ["qwen3_moe", "qwen3_moe_unnormed", "qwen3_moe_all_sparse"]
