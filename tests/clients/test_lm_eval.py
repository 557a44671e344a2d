"""lm-evaluation-harness's `local-completions` model, run as its users run it, against modelyard.

It scores multiple-choice tasks through `echo` + `logprobs` + `max_tokens: 1` on token-id prompts
and, with no Hugging Face tokenizer reachable, finds the server's own through vLLM's routes
(GET /tokenizer_info, POST /tokenize and /detokenize at the root). The test runs the real
`lm_eval` CLI (installed by `scripts/install --dev` into .venv-clients) on two small local tasks
and requires its log-likelihoods to equal what the same tokens score through /completions
directly, and its generations to equal the same greedy requests'.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from testkit.servers import MODEL, served

pytestmark = pytest.mark.model

KEY = "lm-eval-key"
ROOT = Path(__file__).resolve().parents[2]
LM_EVAL = Path(os.environ.get("MODELYARD_CLIENTS_VENV", ROOT / ".venv-clients")) / "bin" / "lm_eval"
CONFIG = f"""\
[server]
api_keys = ["{KEY}"]

[[endpoints]]
name = "{MODEL}"
context = 512
parallel = 2
batch = 128
threads = 1
"""
MC = [{"question": "The capital of France is", "choices": ["Paris", "London", "Berlin"], "answer": 0},
      {"question": "Two plus two equals", "choices": ["three", "four", "five"], "answer": 1},
      {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Fahrenheit"], "answer": 0}]
GEN = [{"prompt": "Q: What is the capital of France?\nA:", "target": "Paris"},
       {"prompt": "Q: What colour is the sky?\nA:", "target": "blue"}]


def task_files(folder: Path) -> None:
    for name, docs in (("mc", MC), ("gen", GEN)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: modelyard_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        f"task: modelyard_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


def samples(out: Path, task: str) -> list[dict]:
    files = list(out.rglob(f"samples_{task}_*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def test_lm_eval_scores_through_modelyard_as_completions_does(tmp_path: Path) -> None:
    assert LM_EVAL.exists(), f"{LM_EVAL} is missing: scripts/install --dev installs it"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task_files(tasks)
    with served(tmp_path / "srv", CONFIG, key=KEY) as srv:
        env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
        # No tokenizer_backend: local-completions detects the server's tokenizer routes itself
        # (and would fall back to a Hugging Face download, unreachable here, if they were wrong).
        args = (f"base_url={srv.base}/v1/completions,model={MODEL},auth_token={KEY},"
                "num_concurrent=1,max_retries=1,max_length=512")
        run = subprocess.run([str(LM_EVAL), "--model", "local-completions", "--model_args", args,
                              "--include_path", str(tasks), "--tasks", "modelyard_mc,modelyard_gen",
                              "--output_path", str(tmp_path / "out"), "--log_samples", "--batch_size", "1"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
        assert "Using remote tokenizer" in run.stderr + run.stdout

        with httpx.Client(base_url=srv.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            def encode(text: str) -> list[int]:
                r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
                assert r.status_code == 200, r.text
                return r.json()["tokens"]

            scored = samples(tmp_path / "out", "modelyard_mc")
            assert len(scored) == len(MC)
            for doc in scored:
                for i, choice in enumerate(doc["doc"]["choices"]):
                    args = doc["arguments"][f"gen_args_{i}"]
                    context, continuation = args["arg_0"], args["arg_1"]
                    assert continuation == " " + choice
                    # lm-eval's split: the context's tokens, then the rest of the whole's
                    whole, ctx = encode(context + continuation), encode(context)
                    assert whole[:len(ctx)] == ctx
                    r = http.post("/v1/completions", json={"model": MODEL, "prompt": whole, "echo": True,
                                                           "logprobs": 1, "max_tokens": 1, "temperature": 0})
                    assert r.status_code == 200, r.text
                    lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
                    expected = sum(lps[len(ctx):len(whole)])
                    logged = float(doc["resps"][i][0][0])
                    assert logged == expected, (context, continuation, logged, expected)

            generated = samples(tmp_path / "out", "modelyard_gen")
            assert len(generated) == len(GEN)
            for doc in generated:
                r = http.post("/v1/completions", json={"model": MODEL, "prompt": encode(doc["doc"]["prompt"]),
                                                       "max_tokens": 8, "temperature": 0, "stop": ["\n"]})
                assert r.status_code == 200, r.text
                text = r.json()["choices"][0]["text"]
                assert text and doc["resps"][0][0] == text, (doc["resps"], text)
