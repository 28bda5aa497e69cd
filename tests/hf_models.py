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
    gemma = family.startswith("gemma") and not family.startswith("gemma4")  # Gemma 4 norms scale by w, not 1 + w
    with torch.no_grad():
        randomize_gemma4_extras(model)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("router.scale", "per_expert_scale")):  # non-identity scales, both conventions
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


# Gemma 4 (tests/test_gemma4.py): every switch of gemma4.py on, windows (16) shorter than the test sequences (48).
# "gemma4": PLE, KV sharing (the last 3 of 6 layers: a sliding one reuses layer 1's keys, a full one layer 2's),
# k = v on full layers with their own head dim (32) and kv heads (1), proportional RoPE (half the pairs rotated),
# twice-wide MLPs on the shared layers. "gemma4_plain": 31B's kind (no PLE, no sharing, separate v, transformers'
# default 5:1 pattern). "gemma4_moe": 26B-A4B's experts beside the MLP.
_GEMMA4 = dict(vocab_size=300, hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=2,
               head_dim=24, global_head_dim=32, sliding_window=16, rms_norm_eps=1e-5, final_logit_softcapping=5.0,
               max_position_embeddings=512, rope_parameters={
                   "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                   "full_attention": {"rope_type": "proportional", "rope_theta": 1e4, "partial_rotary_factor": 0.5}})
HF_CONFIGS.update({
    "gemma4": ("Gemma4TextConfig", dict(
        _GEMMA4, num_hidden_layers=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=300, num_kv_shared_layers=3, attention_k_eq_v=True,
        num_global_key_value_heads=1, use_double_wide_mlp=True)),
    "gemma4_plain": ("Gemma4TextConfig", dict(_GEMMA4, num_hidden_layers=7, hidden_size_per_layer_input=0)),
    "gemma4_moe": ("Gemma4TextConfig", dict(
        _GEMMA4, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
        hidden_size_per_layer_input=0, attention_k_eq_v=True, num_global_key_value_heads=1, enable_moe_block=True,
        num_experts=6, top_k_experts=2, moe_intermediate_size=48)),
})
GEMMA4_VARIANTS = ["gemma4", "gemma4_plain", "gemma4_moe"]


def randomize_gemma4_extras(model):
    """Gemma 4's layer_scalar is a buffer (not a parameter): away from 1, so that it is tested."""
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.uniform_(0.5, 1.5)


def to_gemma4_hub_config(path: pathlib.Path) -> None:
    """Rewrite a transformers-5 Gemma 4 config.json as the Hub writes it: global_head_dim and
    num_global_key_value_heads instead of per_layer_config."""
    file = path / "config.json"
    cfg = json.loads(file.read_text())
    overrides = list(cfg.pop("per_layer_config").values())
    if overrides:
        cfg["global_head_dim"] = overrides[0]["head_dim"]
        if cfg["attention_k_eq_v"]:
            cfg["num_global_key_value_heads"] = overrides[0].get("num_key_value_heads", cfg["num_key_value_heads"])
    file.write_text(json.dumps(cfg, indent=2))
