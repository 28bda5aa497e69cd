"""lm-evaluation-harness through serve.py: its `local-completions` backend against our server on the real Gemma
3 270M gives the per-choice log-likelihoods of its own `hf` backend (transformers on the same directory) to
1e-3, the same accuracy on a local multiple-choice task, and the same greedy answers on a generate_until task.
Both tasks and their data are written here (no network); lm-eval (requirements-dev.txt) is a test-time
reference only, as transformers is."""
import json

import pytest

from test_serve import Server

# (question, choices, the right one's index): facts a 270M model knows some of, so accuracy is neither 0 nor 1
QUESTIONS = [
    ("The capital of France is", [" Paris", " London", " Berlin", " Madrid"], 0),
    ("The capital of Japan is", [" Seoul", " Tokyo", " Beijing", " Bangkok"], 1),
    ("The largest planet in the solar system is", [" Mars", " Venus", " Jupiter", " Mercury"], 2),
    ("Water freezes at a temperature of", [" 100 degrees", " 50 degrees", " 0 degrees", " 10 degrees"], 2),
    ("The opposite of hot is", [" cold", " warm", " big", " fast"], 0),
    ("A week has", [" five days", " six days", " seven days", " ten days"], 2),
    ("The color of the sky on a clear day is", [" green", " blue", " red", " yellow"], 1),
    ("Two plus two equals", [" three", " five", " four", " six"], 2),
    ("The chemical symbol for gold is", [" Ag", " Au", " Fe", " Pb"], 1),
    ("The author of Romeo and Juliet is", [" Charles Dickens", " Mark Twain", " William Shakespeare",
                                           " Jane Austen"], 2),
    ("The animal known as the king of the jungle is the", [" lion", " mouse", " rabbit", " cow"], 0),
    ("The longest river in Africa is the", [" Amazon", " Danube", " Thames", " Nile"], 3),
    ("Bees make", [" milk", " honey", " silk", " wool"], 1),
    ("The first president of the United States was", [" Abraham Lincoln", " George Washington",
                                                       " Thomas Jefferson", " John Adams"], 1),
    ("A triangle has", [" three sides", " four sides", " five sides", " six sides"], 0),
    ("The boiling point of water at sea level is", [" 50 degrees Celsius", " 100 degrees Celsius",
                                                    " 150 degrees Celsius", " 200 degrees Celsius"], 1),
]
GENERATE = [("Q: What is the capital of France?\nA:", "Paris"), ("Q: What is two plus two?\nA:", "4"),
            ("Q: What color is grass?\nA:", "Green"), ("Q: How many legs does a spider have?\nA:", "8")]

MC_TASK = """task: nanotune_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
GENERATE_TASK = """task: nanotune_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_tasks(directory) -> None:
    """The two tasks' YAML and their JSONL data in `directory` (lm-eval's include_path)."""
    mc, gen = directory / "mc.jsonl", directory / "gen.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    gen.write_text("".join(json.dumps({"question": q, "target": t}) + "\n" for q, t in GENERATE))
    (directory / "nanotune_mc.yaml").write_text(MC_TASK.format(data=mc))
    (directory / "nanotune_gen.yaml").write_text(GENERATE_TASK.format(data=gen))


def evaluate(model: str, model_args: str, directory) -> dict:
    """lm-eval's Python API on both tasks: results and logged samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["nanotune_mc", "nanotune_gen"],
                                   task_manager=TaskManager(include_path=str(directory)), log_samples=True,
                                   batch_size=1, device="cpu", random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def without_quantization_config(directory, out):
    """The checkpoint as a directory of links but for config.json, written without the `quantization_config` that
    converting the GGUF left in it: lm-eval passes it on to from_pretrained, which then wants the GGUF file."""
    out.mkdir()
    for f in directory.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    return out


def per_choice(samples: list[dict]) -> dict[int, list[float]]:
    """doc_id → each choice's log-likelihood, as lm-eval logged it."""
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}


@pytest.mark.slow
def test_local_completions_against_the_server_equals_the_hf_backend(gemma3_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    write_tasks(tmp_path)
    server = Server("--ckpt", str(gemma3_dir))
    try:
        ours = evaluate("local-completions", f"model={gemma3_dir.name},base_url={server.url}/v1/completions,"
                        f"tokenizer_backend=huggingface,tokenizer={gemma3_dir},add_bos_token=True,num_concurrent=1,"
                        "max_retries=1", tmp_path)
    finally:
        server.close()
    plain = without_quantization_config(gemma3_dir, tmp_path / gemma3_dir.name)
    reference = evaluate("hf", f"pretrained={plain},dtype=float32", tmp_path)

    ours_ll, reference_ll = (per_choice(r["samples"]["nanotune_mc"]) for r in (ours, reference))
    assert ours_ll.keys() == reference_ll.keys() and len(ours_ll) == len(QUESTIONS)
    worst = max(abs(a - b) for doc in ours_ll for a, b in zip(ours_ll[doc], reference_ll[doc], strict=True))
    accuracy = [r["results"]["nanotune_mc"]["acc,none"] for r in (ours, reference)]
    print(f"max per-choice difference {worst:.2e}; accuracy: server {accuracy[0]}, hf {accuracy[1]}")
    assert worst < 1e-3 and accuracy[0] == accuracy[1]
    answers = [{s["doc_id"]: s["resps"][0][0] for s in r["samples"]["nanotune_gen"]} for r in (ours, reference)]
    print("greedy answers:", answers)
    assert answers[0] == answers[1]
    assert ours["results"]["nanotune_gen"]["exact_match,none"] == reference["results"]["nanotune_gen"][
        "exact_match,none"]
