"""lora.py — LoRA and QLoRA: fine-tune low-rank adapters beside a frozen (optionally 4-bit) base.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes every weight W and learns a rank-r update on
the chosen projections (default: q k v o gate up down), scaled by alpha / r (rsLoRA: alpha / √r):

    y = x W + (alpha / r) · dropout(x) A B,    A [in, r] random, B [r, out] = 0 at the start

so the model computes exactly what the base does until B trains. QLoRA (Dettmers et al. 2023,
arXiv 2305.14314) also stores the frozen W as 4-bit NormalFloat codes (or int8): blocks of 64
values share one absmax scale, and each value is the index of the nearest of 16 NF4 levels
(quantiles of a normal distribution); W is dequantized inside the forward pass, layer by layer,
so its float copy never exists at once. Only A and B are differentiated and have optimizer state.

Where the pieces live: the adapter factors, their initialisation (`add_lora`), the update
(`lora_delta`), quantization (`quantize`, `quantize_model`, NF4_LEVELS) and merging (`merge_lora`)
are in adapters.py, because every script's --lora and sample.py use them; `projections` in
model.py is where the forward pass reads them. PEFT's adapter files
(`adapter_config.json`, `adapter_model.safetensors`) are written and read by ckpt.save_peft /
load_peft. The loss and the loop are SFT's (sft.train), on the adapters instead of all parameters: lora.py
→ sft.py is the one import of a script by another, so a hacked LoRA loss means copying sft.py too.

With no arguments it trains rank-8 adapters on a frozen *random* tiny Qwen 3 (9% of its
parameters; on real models well under 1%) to add 3-digit numbers, "123+045=" → "0168", reaching
≥ 0.9 held-out accuracy in about two minutes on a laptop CPU:

    python lora.py
    python lora.py --ckpt path/to/gemma-3-270m --quant nf4 --data train.jsonl --lr 2e-4 --merge
    python lora.py --model qwen3 --ckpt DIR --data train.jsonl --dtype bfloat16 --tpu --mesh fsdp=-1,tp=4

Outputs in --out: metrics.jsonl, checkpoints/ (resume with --resume), adapter/ (PEFT's layout:
`peft.PeftModel.from_pretrained(hf_model, "runs/lora/adapter")`), and with --merge hf/, a full
checkpoint with W + (alpha / r) A B. --adapter DIR continues from a PEFT adapter.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar
import pathlib
import sys

import jax
from flax import nnx

import adapters
import ckpt
import flags
import model as model_lib
import run
import sft
import shard


@dataclasses.dataclass
class Config(sft.Config):
    # -- LoRA / QLoRA --
    lora_rank: int = 8  # r
    lora_alpha: float = 16.0  # the update is scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on the adapters' inputs
    lora_targets: str = ""  # projections that get adapters ("": q,k,v,o,gate,up,down; a MoE model: q,k,v,o)
    rslora: bool = False  # scale by alpha / sqrt(r) (rank-stabilised LoRA)
    quant: str = ""  # QLoRA: store the frozen base as nf4 or int8 ("" keeps float32)
    quant_block: int = 64  # values per quantization scale
    adapter: str | None = None  # PEFT adapter directory to continue from (its rank and targets win)
    merge: bool = False  # also write out/hf: the base with the adapters merged in
    task: str = "+,3,3"  # built-in task: operator, digits of a, digits of b (the demo's adapters learn addition)
    lr: float | None = None  # peak learning rate (pretrained: TRL's and PEFT's LoRA examples' rate, adapters start at 0)
    AUTO: ClassVar[dict] = {"lr": (5e-3, 2e-4)}  # the fields left None: (a random tiny model, pretrained)

    def __post_init__(self):
        super().__post_init__()
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("need --lora-rank >= 1, --lora-alpha > 0 and 0 <= --lora-dropout < 1")
        unknown = set(self.lora_targets.split(",")) - set(adapters.TARGETS) if self.lora_targets else ()
        if unknown:
            raise ValueError(f"unknown --lora-targets {', '.join(sorted(unknown))}; "
                             f"choose from {','.join(adapters.TARGETS)}")
        if self.quant not in ("", *adapters.QUANT_FORMATS) or self.quant_block < 2 or self.quant_block % 2:
            raise ValueError(f"--quant must be nf4 or int8 and --quant-block even, got {self.quant!r} "
                             f"{self.quant_block}")


def attach_adapters(model, cfg: Config) -> dict:
    """Adapters on the model (fresh, B = 0, or --adapter's), then the frozen base quantized (--quant),
    in place. Returns the memory figures logged at step 0."""
    n_base = model_lib.count_params(model)
    if cfg.adapter:
        ckpt.load_peft(model, cfg.adapter)
    else:
        targets = tuple(cfg.lora_targets.split(",")) if cfg.lora_targets else None  # None: all the model has
        adapters.add_lora(model, cfg.lora_rank, cfg.lora_alpha, targets, cfg.lora_dropout, cfg.rslora, seed=cfg.seed)
    if cfg.quant:
        adapters.quantize_model(model, cfg.quant, cfg.quant_block)
    n_train = sum(x.size for x in jax.tree.leaves(nnx.state(model, adapters.LoRA)))
    return {"trainable_params": n_train, "trainable_fraction": n_train / n_base,
            "param_bytes": model_lib.param_bytes(model), "param_bytes_float32": 4 * n_base}


def main(argv=None):
    cfg = flags.parse(Config, argv)
    out = pathlib.Path(cfg.out)
    with flags.user_errors():
        loaded = run.load(cfg)
        memory = attach_adapters(loaded.model, cfg)
    if shard.is_main_process():
        lora, share = loaded.model.lora, memory["param_bytes"] / memory["param_bytes_float32"]
        print(f"LoRA r={lora.rank} on {','.join(lora.targets)}: training {memory['trainable_params'] / 1e6:.3f}M "
              f"parameters ({100 * memory['trainable_fraction']:.2f}%); parameter memory "
              f"{memory['param_bytes'] / 2**20:.1f} MiB = {100 * share:.0f}% of float32 ({cfg.quant or 'float32'} base)",
              file=sys.stderr)
    trained = sft.train(cfg, loaded, loaded.model, trainable=adapters.LoRA, first_record=memory)
    # the adapters in PEFT's layout; with --merge, a full HF checkpoint as well
    run.export_peft(trained, out / "adapter", loaded)
    saved = [out / "adapter"]
    if cfg.merge:
        run.export_hf(adapters.merge_lora(trained), out / "hf", loaded)
        saved.append(out / "hf")
    if shard.is_main_process():
        print(f"saved {', '.join(map(str, saved))}; metrics in {out / 'metrics.jsonl'}", file=sys.stderr)


if __name__ == "__main__":
    main()
