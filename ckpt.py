"""ckpt.py — weights in and out.

Hugging Face checkpoints (config.json + safetensors, single or sharded) become a `model.Transformer`
and go back out in the same layout, so that `transformers.AutoModelForCausalLM.from_pretrained` loads
what we save with the same logits. Loading never unpickles: safetensors only.

    model = load_hf("path/to/Qwen3-0.6B", dtype="bfloat16")
    save_hf(model, "runs/sft/hf")
    model, source, directory = load_model("qwen3-0.6b")   # a real preset: HF cache, else downloaded
"""
from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import pathlib
import shutil
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import ml_dtypes
from safetensors.numpy import save_file

import adapters
import gemma4
import moe
from model import CONFIGS, Config, Transformer, every_nth_global, get_config, layer_shapes


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


# ----------------------------------------------------------------------------- config.json

FAMILIES = {"llama": "llama3", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3", "gemma": "gemma",
            "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}  # Qwen 3 MoE: Qwen 3 with cfg.experts
HF_MODEL_TYPE = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
HF_ARCH = {"llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
HF_ACT = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def _ids(x) -> tuple[int, ...]:
    return () if x is None else tuple(x) if isinstance(x, list) else (x,)


def config_from_hf(hf: dict, **overrides) -> Config:
    """Our Config from an HF config.json dict, in the hub's classic form (rope_theta, rope_scaling, rope_local_base_freq,
    sliding_window_pattern) or transformers 5's (rope_parameters, layer_types). Gemma 4: gemma4.config_from_hf."""
    if hf.get("model_type") in ("gemma3", "gemma4") and "text_config" in hf:  # multimodal Gemma 3 / 4: its text model
        hf = {**hf["text_config"], "model_type": hf["model_type"] + "_text", "tie_word_embeddings": True,
              **{k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}}
    if hf.get("model_type") == "gemma4_text":
        return gemma4.config_from_hf(hf).replace(**overrides)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"unknown model_type {model_type!r}; supported: {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    gemma = family.startswith("gemma")
    defaults = CONFIGS[f"tiny-{family}"]  # the family's switches; sizes all come from the file
    if hf.get("attention_bias") and family != "qwen2" or hf.get("mlp_bias"):
        raise CheckpointError(f"{model_type}: attention_bias/mlp_bias checkpoints are not supported")
    n_layers, n_heads = hf["num_hidden_layers"], hf["num_attention_heads"]

    # RoPE: transformers 5 nests it per layer type; the classic form has flat fields.
    rope = hf.get("rope_parameters") or {}
    if "full_attention" in rope or "sliding_attention" in rope:
        global_rope, local_rope = rope.get("full_attention", {}), rope.get("sliding_attention")
    else:
        global_rope, local_rope = rope, None
    scaling = dict(hf.get("rope_scaling") or {}) or dict(global_rope)
    scaling_type = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling_type not in ("default", "linear", "llama3"):
        raise CheckpointError(f"unsupported rope scaling type {scaling_type!r}")
    theta = global_rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    local_theta = (local_rope or {}).get("rope_theta", hf.get("rope_local_base_freq"))

    # Which layers slide: layer_types if present, else the family's rule.
    window = hf.get("sliding_window")
    if hf.get("layer_types"):
        sliding = tuple(t == "sliding_attention" for t in hf["layer_types"])
    elif family == "gemma2":
        sliding = every_nth_global(n_layers, 2)
    elif family == "gemma3":
        period = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        sliding = every_nth_global(n_layers, period)
    elif family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        sliding = tuple(i >= hf.get("max_window_layers", n_layers) for i in range(n_layers))
    else:
        sliding = ()
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        sliding = ()  # Qwen writes a sliding_window size even when it is switched off
    if not any(sliding):
        sliding, window = (), None

    act = hf.get("hidden_activation") or hf.get("hidden_act") or defaults.act
    act = {"gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "gelu": "gelu_tanh" if gemma else "gelu"}.get(act)
    if act is None:
        raise CheckpointError(f"unsupported activation {hf.get('hidden_activation') or hf.get('hidden_act')!r}")
    qpas = hf.get("query_pre_attn_scalar")
    cfg = Config(
        family=family, vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, ffn_dim=hf["intermediate_size"],
        act=act, norm_eps=hf.get("rms_norm_eps", 1e-6), norm_plus_one=defaults.norm_plus_one,
        qk_norm=defaults.qk_norm, qkv_bias=defaults.qkv_bias, rope_theta=float(theta),
        rope_local_theta=float(local_theta) if local_theta and family == "gemma3" else None,
        rope_scaling=None if scaling_type == "default" else scaling_type, rope_factor=float(scaling.get("factor", 1.0)),
        rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        rope_original_max_len=int(scaling.get("original_max_position_embeddings", 8192)),
        sliding_window=window, sliding_layers=sliding, query_scale=qpas ** -0.5 if qpas else None,
        attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
        post_norms=defaults.post_norms, embed_scale=defaults.embed_scale,
        tie_embeddings=hf.get("tie_word_embeddings", gemma), max_seq_len=hf.get("max_position_embeddings", 8192),
        bos_id=hf.get("bos_token_id"), eos_ids=_ids(hf.get("eos_token_id")), pad_id=hf.get("pad_token_id"),
        experts=moe.experts_from_hf(hf))
    return cfg.replace(**overrides)


def config_to_hf(cfg: Config) -> dict:
    """config.json in the classic field names, which transformers 4.x and 5.x both read."""
    if cfg.gemma4:
        return gemma4.config_to_hf(cfg)
    hf = {"architectures": [HF_ARCH[cfg.family]], "model_type": HF_MODEL_TYPE[cfg.family],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
        "bos_token_id": cfg.bos_id, "pad_token_id": cfg.pad_id,
        "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) > 1 else (cfg.eos_ids or [None])[0],
        "attention_bias": cfg.qkv_bias if cfg.family != "qwen2" else None, "torch_dtype": cfg.param_dtype,
    }
    hf["hidden_activation" if cfg.family in ("gemma2", "gemma3") else "hidden_act"] = HF_ACT[cfg.act]
    if cfg.rope_scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                              "high_freq_factor": cfg.rope_high_freq_factor,
                              "original_max_position_embeddings": cfg.rope_original_max_len}
    if cfg.family in ("gemma2", "gemma3"):
        qpas = (cfg.query_scale or cfg.head_dim ** -0.5) ** -2
        hf.update(query_pre_attn_scalar=round(qpas) if abs(qpas - round(qpas)) < 1e-6 else qpas,
                  attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)
    if cfg.rope_local_theta is not None:
        hf["rope_local_base_freq"] = cfg.rope_local_theta
    if any(cfg.sliding_layers):
        hf["sliding_window"] = cfg.sliding_window
        hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]
        if cfg.family in ("qwen2", "qwen3"):
            hf.update(use_sliding_window=True, max_window_layers=cfg.sliding_layers.index(True))
    return {k: v for k, v in {**hf, **moe.experts_to_hf(cfg)}.items() if v is not None}


# ----------------------------------------------------------------------------- the name table

# HF tensor name → our parameter, and how the tensor is laid out. `n_in` None: same shape;
# 0: a flat vector reshaped to ours (biases [N*H] → [N, H]); 1 or 2: an HF Linear weight
# [out, in] whose `in` is our first n_in axes (q [N*H, D] → [D, N, H]; o [D, N*H] → [N, H, D]).
GLOBAL_NAMES = [("model.embed_tokens.weight", "embed", None), ("model.norm.weight", "final_norm", None),
                ("lm_head.weight", "lm_head", None)]
LAYER_NAMES = [("input_layernorm.weight", "attn_norm", None),
    ("self_attn.q_proj.weight", "q", 1), ("self_attn.k_proj.weight", "k", 1), ("self_attn.v_proj.weight", "v", 1),
    ("self_attn.q_proj.bias", "q_bias", 0), ("self_attn.k_proj.bias", "k_bias", 0),
    ("self_attn.v_proj.bias", "v_bias", 0), ("self_attn.o_proj.weight", "o", 2),
    ("self_attn.q_norm.weight", "q_norm", None), ("self_attn.k_norm.weight", "k_norm", None),
    # Gemma 2/3 name their norm after attention so; the other families their norm before the MLP.
    ("post_attention_layernorm.weight", "post_attn_norm|ffw_norm", None),
    ("pre_feedforward_layernorm.weight", "ffw_norm", None),  # Gemma 2/3
    ("post_feedforward_layernorm.weight", "post_ffw_norm", None),  # Gemma 2/3
    ("mlp.gate_proj.weight", "gate", 1), ("mlp.up_proj.weight", "up", 1), ("mlp.down_proj.weight", "down", 1),
    ("mlp.gate.weight", "router", 1),  # Qwen 3 MoE's sparse layers: the router, and each expert's own tensors
    ("mlp.experts.{e}.gate_proj.weight", "expert_gate", 1), ("mlp.experts.{e}.up_proj.weight", "expert_up", 1),
    ("mlp.experts.{e}.down_proj.weight", "expert_down", 1),
]


def name_table(cfg: Config) -> list[tuple[str, str, int | None]]:
    """(HF name, our name, n_in) for every tensor of this config; layer names use {i} (Gemma 4: a row per layer)."""
    if cfg.gemma4:
        return gemma4.name_table(cfg, GLOBAL_NAMES)
    table = [row for row in GLOBAL_NAMES if row[1] != "lm_head" or not cfg.tie_embeddings]
    ours = layer_shapes(cfg)
    for hf, name, n_in in LAYER_NAMES:
        if "|" in name:
            name = name.split("|")[0 if cfg.post_norms else 1]
        elif name == "ffw_norm" and not cfg.post_norms:
            continue  # pre_feedforward_layernorm exists only beside sandwich norms
        if name in ours:
            table.append((f"model.layers.{{i}}.{hf}", f"layers.{name}", n_in))
    return table


def hf_shape(ours: tuple[int, ...], n_in: int | None) -> tuple[int, ...]:
    if n_in is None:
        return tuple(ours)
    if n_in == 0:
        return (math.prod(ours),)
    return (math.prod(ours[n_in:]), math.prod(ours[:n_in]))


def to_ours(x: np.ndarray, ours: tuple[int, ...], n_in: int | None) -> np.ndarray:
    return x.T.reshape(ours) if n_in else x.reshape(ours)


def to_hf(x: np.ndarray, n_in: int | None) -> np.ndarray:
    if n_in is None:
        return x
    if n_in == 0:
        return x.reshape(-1)
    return x.reshape(math.prod(x.shape[:n_in]), -1).T


# ----------------------------------------------------------------------------- loading

# Tensors some exports carry that are not weights, and the vision (audio) half of multimodal Gemma 3 (4).
IGNORED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.", *gemma4.TOWERS)
RENAMES = (("model.language_model.", "model."), ("language_model.model.", "model."),
           ("language_model.lm_head.", "lm_head."))


def _canonical(name: str) -> str:
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def read_config(path: pathlib.Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def tensor_index(path: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    """Every tensor (by its text-model name) → the safetensors file and the name stored there."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from None
        files = {name: path / f for name, f in weight_map.items()}
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: no *.safetensors files (pickled .bin checkpoints are not read)")
        files = {}
        for shard in shards:
            for name in SafetensorsFile(shard).keys():
                files[name] = shard
    for f in set(files.values()):
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the index but missing")
    return {_canonical(n): (f, n) for n, f in files.items() if not n.startswith(IGNORED_PREFIXES)
            and not n.endswith("rotary_emb.inv_freq")}


SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
                      "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """Zero-copy, read-only views into a memory-mapped .safetensors file: an 8-byte little-endian header
    size, a JSON header {name: {dtype, shape, data_offsets}}, raw bytes. Mapping it lets the loader copy each
    tensor straight from the page cache into its final stacked array, with no intermediate host copy; every
    header entry is checked against the file size, so a truncated file fails by name."""

    def __init__(self, file: pathlib.Path):
        self.file = file
        try:
            with open(file, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > size - 8:
                    raise ValueError("header size past the end of the file")
                self.header = json.loads(f.read(n))
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else b""
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        self.header.pop("__metadata__", None)
        self.base = 8 + n
        for name, t in self.header.items():
            dtype = SAFETENSORS_DTYPES.get(t.get("dtype")) if isinstance(t, dict) else None
            start, end = t.get("data_offsets", (0, -1)) if dtype else (0, -1)
            if dtype is None or end - start != math.prod(t["shape"]) * np.dtype(dtype).itemsize \
                    or self.base + end > size:
                raise CheckpointError(f"{file}: not a readable safetensors file (tensor {name} is "
                                      f"malformed or runs past the end of the file)")

    def keys(self):
        return self.header.keys()

    def release(self) -> None:  # the pages read so far leave the resident set (a view still in use reads them again)
        if isinstance(self.map, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED)

    def get(self, name: str) -> np.ndarray:
        t = self.header[name]
        dtype = SAFETENSORS_DTYPES[t["dtype"]]
        return np.frombuffer(self.map, dtype, math.prod(t["shape"]), self.base + t["data_offsets"][0]).reshape(t["shape"])


def abstract_model(cfg: Config) -> Transformer:
    """The model's structure with shapes and dtypes but no memory (jax.eval_shape)."""
    return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))


def load_hf(path, dtype: str | None = None, param_dtype: str | None = None, **overrides) -> Transformer:
    """A Transformer with the weights of an HF checkpoint directory.

    dtype: compute dtype (default float32); param_dtype: storage dtype (default: dtype).
    Tensors are read one at a time and each stacked parameter is built once, so peak
    host memory stays near the size of the model in param_dtype plus one parameter.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    dtype = dtype or "float32"
    hf_config = read_config(path)
    try:
        cfg = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype or dtype, **overrides)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:  # a field missing, wrong
        detail = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path / 'config.json'}: not a config this loader understands "
                              f"({(detail.splitlines() or [''])[0][:200]})") from None
    gemma4.say_skipped_towers(hf_config)  # a multimodal Gemma 4's vision and audio: one line on stderr
    table = name_table(cfg)
    files = moe.unfused(tensor_index(path), cfg)  # fused expert tensors listed per expert
    expected = {n for hf, name, _ in table for _, n in (moe.stacked_rows(cfg, hf, name) if "{i}" in hf else [(0, hf)])}
    missing = sorted(expected - set(files))
    unexpected = sorted(set(files) - expected - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    for problem, names in ((f"missing tensors for {cfg.family}", missing), ("unexpected tensors", unexpected)):
        if names:
            raise CheckpointError(f"{path}: {problem}: {', '.join(names[:8])}"
                                  + (f" (+{len(names) - 8} more)" if len(names) > 8 else ""))

    graphdef, state = nnx.split(abstract_model(cfg))
    handles: dict[pathlib.Path, SafetensorsFile] = {}

    def read(name: str, ours: tuple[int, ...], n_in) -> np.ndarray:
        file, stored = files[name]
        if file not in handles:
            handles[file] = SafetensorsFile(file)
        if getattr(stored, "name", stored) not in handles[file].keys():
            raise CheckpointError(f"{file}: has no tensor {stored} (the index says it does)")
        x = handles[file].get(stored) if isinstance(stored, str) else stored.read(handles[file])
        if tuple(x.shape) != hf_shape(ours, n_in):
            raise CheckpointError(f"{name}: checkpoint shape {tuple(x.shape)} does not match the config's "
                                  f"{hf_shape(ours, n_in)} ({file.name})")
        return to_ours(x, ours, n_in)

    flat = dict(nnx.to_flat_state(state))
    for hf, name, n_in in table:
        var = flat[tuple(int(k) if k.isdigit() else k for k in name.split("."))]  # layers.3.q: Gemma 4's per-layer
        target = np.dtype(var.dtype)
        if "{i}" in hf:  # stack layer (and expert) tensors into one [L, (E,) ...] array, filled in place
            rows = moe.stacked_rows(cfg, hf, name)
            first = read(rows[0][1], var.shape[len(rows[0][0]):], n_in)  # shape checked before the stack is allocated
            stacked = np.zeros(var.shape, target)  # what no tensor fills (a mixed model's unused kind of MLP) is 0
            for k, (index, hf_name) in enumerate(rows):
                stacked[index] = read(hf_name, var.shape[len(index):], n_in) if k else first  # casts on assignment
        else:
            stacked = np.array(read(hf, var.shape, n_in), target)  # a copy: never alias the file map
        var.set_value(jnp.asarray(stacked))
        del stacked
        for handle in handles.values():  # the loader holds about one tensor of the file at a time
            handle.release()
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------- saving

def save_hf(model: Transformer, path, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json + safetensors (sharded with an index above max_shard_bytes).

    The files go to a temporary directory beside `path` that replaces `path` only when
    complete, so an interrupted save never damages an existing checkpoint.
    """
    cfg, path = model.cfg, pathlib.Path(path)
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    def tensors():  # (HF name, numpy array), one at a time
        for hf, name, n_in in name_table(cfg):
            value = np.asarray(jax.device_get(flat[name].get_value()))
            if "{i}" in hf:
                for index, hf_name in moe.stacked_rows(cfg, hf, name):
                    yield hf_name, np.ascontiguousarray(to_hf(value[index], n_in))
            else:
                yield hf, np.ascontiguousarray(to_hf(value, n_in))

    with replaced_dir(path) as tmp:
        shards, current, size, total = [], {}, 0, 0  # write each shard as soon as it is full

        def flush():
            shards.append((f"shard-{len(shards) + 1:05d}.tmp", list(current)))
            save_file(current, str(tmp / shards[-1][0]), metadata={"format": "pt"})

        for name, x in tensors():
            if current and size + x.nbytes > max_shard_bytes:
                flush()
                current, size = {}, 0
            current[name], size, total = x, size + x.nbytes, total + x.nbytes
        flush()
        n = len(shards)
        weight_map = {}
        for i, (tmp_name, names) in enumerate(shards, 1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / tmp_name, tmp / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")


@contextlib.contextmanager
def replaced_dir(path: pathlib.Path):
    """Yields a temporary directory beside `path` that replaces `path` when the block completes;
    on an exception it is deleted and `path` is untouched (never a half-written checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():  # swap in the new directory, then drop the old one
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "ckpt")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ----------------------------------------------------------------------------- LoRA adapters (PEFT's layout)

# Our adapter target → the HF module it wraps. PEFT names each factor
# base_model.model.<module path>.lora_A.weight [r, in] and .lora_B.weight [out, r].
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
PEFT_PREFIX = "base_model.model.model.layers.{i}."


def save_peft(model: Transformer, path, base_model: str | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel.from_pretrained
    onto the transformers model (atomically replaced, like save_hf)."""
    lora, path = model.lora, pathlib.Path(path)
    tensors = {}
    for name in lora.targets:
        for factor in "ab":
            for layers, var, stacked in adapters.factor_vars(model, name, factor):
                x = np.asarray(jax.device_get(var[...]), np.float32)
                x = x if stacked else x[None]  # A [L, in..., r] → [r, in]; B [L, r, out...] → [out, r]
                for j, i in enumerate(layers):
                    hf = f"{PEFT_PREFIX.format(i=i)}{PEFT_MODULES[name]}.lora_{factor.upper()}.weight"
                    tensors[hf] = np.ascontiguousarray(to_hf(x[j], x.ndim - 2 if factor == "a" else 1))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
              "target_modules": sorted(PEFT_MODULES[t].split(".")[1] for t in lora.targets),
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True}
    with replaced_dir(path) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_peft(model: Transformer, path) -> Transformer:
    """Attach the LoRA adapter of a PEFT directory to `model` in place (a plain LoRA: no DoRA,
    no per-layer ranks, no bias or extra trained modules); CheckpointError names what is wrong."""
    path = pathlib.Path(path)
    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (config_file, weights):
        if not f.is_file():
            raise CheckpointError(f"{path}: not a PEFT adapter directory (no {f.name})")
    try:
        config = json.loads(config_file.read_text())
        return _attach_peft(model, config, config_file, weights)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
        if isinstance(e, CheckpointError):
            raise
        detail = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{config_file}: not an adapter config this loader understands "
                              f"({(detail.splitlines() or [''])[0][:200]})") from None


def _attach_peft(model: Transformer, config, config_file: pathlib.Path, weights: pathlib.Path) -> Transformer:
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_file}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}, only LORA is supported")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
                   if config.get(k)] + (["bias"] if config.get("bias", "none") != "none" else [])
    if unsupported:
        raise CheckpointError(f"{config_file}: unsupported LoRA options: {', '.join(unsupported)}")
    modules = config.get("target_modules")
    by_module = {m.split(".")[1]: t for t, m in PEFT_MODULES.items()}
    if modules == "all-linear":
        modules = list(by_module)
    if not isinstance(modules, list) or not modules or any(m not in by_module for m in modules):
        raise CheckpointError(f"{config_file}: target_modules {modules!r}: need a list among {', '.join(by_module)}")
    targets, rank = tuple(by_module[m] for m in modules), int(config["r"])
    if not 1 <= rank <= model.cfg.dim:  # before anything of that size is allocated
        raise CheckpointError(f"{config_file}: r = {rank} is not a rank of a {model.cfg.dim}-wide model")
    adapters.add_lora(model, rank, float(config.get("lora_alpha", 8)), targets,
             dropout=float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora")))
    file = SafetensorsFile(weights)
    for name in model.lora.targets:
        for factor in "ab":
            for layers, var, stacked in adapters.factor_vars(model, name, factor):
                ours = var.shape[1:] if stacked else var.shape
                n = len(ours) - 1 if factor == "a" else 1  # A: [in..., r]; B: [r, out...]
                values = np.empty((len(layers), *ours), np.dtype(var.dtype))
                for j, i in enumerate(layers):
                    hf = f"{PEFT_PREFIX.format(i=i)}{PEFT_MODULES[name]}.lora_{factor.upper()}.weight"
                    if hf not in file.keys():
                        raise CheckpointError(f"{weights}: missing tensor {hf}")
                    x = file.get(hf)
                    if tuple(x.shape) != hf_shape(ours, n):
                        raise CheckpointError(f"{hf}: adapter shape {tuple(x.shape)} does not match the model's "
                                              f"{hf_shape(ours, n)} ({weights.name})")
                    values[j] = to_ours(x, ours, n)
                var.set_value(jnp.asarray(values if stacked else values[0]))
    return model


# ----------------------------------------------------------------------------- presets

HF_REPOS = {
    "llama3.2-1b": "meta-llama/Llama-3.2-1B", "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B", "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B", "qwen3-0.6b": "Qwen/Qwen3-0.6B", "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B", "qwen3-8b": "Qwen/Qwen3-8B", "gemma-2b": "google/gemma-2b",
    "gemma2-2b": "google/gemma-2-2b", "gemma3-270m": "google/gemma-3-270m", "gemma3-1b": "google/gemma-3-1b-pt",
    "gemma3-4b": "google/gemma-3-4b-pt", "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B", **gemma4.HUB_REPOS}


def hub_repo(name: str) -> str | None:
    """The Hub repository of a preset or family alias (None for the tiny presets)."""
    cfg = get_config(name)
    return HF_REPOS.get(next(k for k, v in CONFIGS.items() if v is cfg))


HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
             "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def hub_snapshot(repo: str) -> pathlib.Path:
    """A Hub repo's checkpoint through huggingface_hub: its local cache (HF_HOME, HF_HUB_CACHE), else a
    download of the config, safetensors and tokenizer files only (HF_TOKEN for gated repos such as Gemma
    and Llama; HF_HUB_OFFLINE=1: the cache only). Otherwise a CheckpointError saying how to get it."""
    from huggingface_hub import errors, snapshot_download
    try:
        return pathlib.Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except errors.GatedRepoError:
        why = "a gated repository: accept its license on the Hub, then set HF_TOKEN"
    except errors.RepositoryNotFoundError:
        why = "the Hub has no such repository (or it is private: set HF_TOKEN)"
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError):
        why = "the Hub cannot be reached from here, or HF_HUB_OFFLINE=1 forbids it"
    except Exception as e:  # a failed or interrupted download, a full disk
        why = f"the download failed: {type(e).__name__}"
    raise CheckpointError(f"{repo} is not in the Hugging Face cache and could not be had: {why}. Download it where "
                          f"the Hub is reachable (`hf download {repo}`), pass --ckpt DIR, or --init random for "
                          "random weights")


class LoadedModel(NamedTuple):
    model: Transformer
    source: str  # where the weights came from: a directory, or "random <preset>"
    directory: pathlib.Path | None  # the checkpoint directory (tokenizer files too); None: random weights


def load_model(name: str = "tiny", ckpt=None, dtype: str | None = None, seed: int = 0,
               param_dtype: str | None = None, init: str = "pretrained", **overrides) -> LoadedModel:
    """`--ckpt DIR` if given; else a real preset's checkpoint from the Hub (hub_snapshot: cached or
    downloaded) unless init is "random"; tiny presets (no Hub repo) start from random weights.
    dtype: compute dtype; param_dtype: storage (default dtype; training keeps float32)."""
    if ckpt:
        return LoadedModel(load_hf(ckpt, dtype=dtype, param_dtype=param_dtype, **overrides), str(ckpt),
                           pathlib.Path(ckpt))
    cfg, repo = get_config(name), hub_repo(name)
    name = next(k for k, v in CONFIGS.items() if v is cfg)
    if repo and init != "random":
        local = hub_snapshot(repo)
        return LoadedModel(load_hf(local, dtype=dtype, param_dtype=param_dtype, **overrides), str(local), local)
    dtypes = {"dtype": dtype or cfg.dtype, "param_dtype": param_dtype or dtype or cfg.param_dtype}
    cfg = cfg.replace(**dtypes, **overrides)
    return LoadedModel(Transformer(cfg, nnx.Rngs(seed)), f"random {name}", None)
