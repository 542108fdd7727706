"""`mixtral serve` against two real third-party clients, run as their own command lines: the `llm`
CLI (0.36, an OpenAI-compatible model from `extra-openai-models.yaml`) and lm-evaluation-harness
(0.4.13, its `local-completions` model scoring a multiple-choice task).

What they send, as captured from them (the payloads the server has to take unchanged):

- `llm -m M "hi"`: POST /v1/chat/completions `{"model", "stream": true, "messages": [...],
  "stream_options": {"include_usage": true}}` plus the `-o` options it was given (temperature,
  max_tokens, seed, ...); `--no-stream` sends `"stream": false` and reads `usage` from the response.
  `--schema` (only for a model whose yaml entry says `supports_schema: true`) adds
  `"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": {...}}}`
  (no `strict`); `-o json_object 1` adds `"response_format": {"type": "json_object"}`. With an
  `api_key_name` in the yaml it sends `Authorization: Bearer $OPENAI_API_KEY`, without one
  `Bearer DUMMY_KEY`.
- `lm_eval --model local-completions`, per loglikelihood request: POST /v1/completions
  `{"model", "prompt": [[ids...], ...], "temperature": 0, "max_tokens": 1, "logprobs": 1,
  "seed": 1234, "echo": true}`: token-id prompts (one list per request, `--batch_size` lists),
  with no BOS unless the tokenizer adds one. It reads, per choice sorted by `index`,
  `logprobs.token_logprobs[ctxlen:-1]` and `logprobs.top_logprobs[ctxlen:-1]` (`-1`: the one
  generated token is dropped, so the echo must hold the prompt's tokens plus exactly one more).
  `tokenizer_backend=auto` (the default) first probes GET /tokenizer_info (3 tries), then loads
  `transformers.AutoTokenizer` from `tokenizer=` (else `model=`): a checkpoint directory works
  (transformers converts tokenizer.model, which needs `protobuf`) and reads text as this project's
  tokenizer does, without a BOS; `{"add_bos_token": true}` in a tokenizer_config.json next to it
  plus `add_bos_token=True` makes it send the BOS, as `mixtral perplexity` scores text.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import torch

KEY = "sk-clients-0123456789"
SERVED = "tiny-mixtral"  # the name llm asks for; the server answers to any
LLM_MODEL = "mixtral-local"  # the model id in llm's yaml
CLIENT_TIMEOUT_S = 300
WAIT_S = 120
CLIENTS = {"llm": ("llm", "0.36"), "lm_eval": ("lm-eval", "0.4.13")}  # command -> (distribution, version)

# a 4-question multiple-choice task, read by lm-eval from a local JSONL file (no network)
QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "London", "Berlin", "Madrid"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "answer": 1},
    {"question": "Which planet is known as the red planet?", "choices": ["Venus", "Mars", "Jupiter", "Saturn"],
     "answer": 1},
    {"question": "What color is the sky on a clear day?", "choices": ["green", "blue"], "answer": 1},
]
TASK = "mixtral_tiny_mc"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def client(name: str) -> str:
    """The client's command: a test dependency, so a missing one fails the test (no skip)."""
    dist, version = CLIENTS[name]
    found = Path(sys.executable).parent / name
    path = str(found) if found.is_file() else shutil.which(name)
    assert path, f"the {name!r} command is missing: pip install '{dist}=={version}' (a test dependency)"
    return path


def client_env(tmp: Path, **extra: str) -> dict:
    """No network, caches and llm's user dir under `tmp`, the server's key where clients read it."""
    env = {k: v for k, v in os.environ.items() if k not in ("MIXTRAL_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(tmp / "hf-home"), "LLM_USER_PATH": str(tmp / "llm-user"), "OPENAI_API_KEY": KEY,
            "NO_COLOR": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def run_client(args: list[str], env: dict, cwd: Path, server: Served) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{args[0]} ran past {CLIENT_TIMEOUT_S} s\n{e.stderr}\nserver log:\n{server.log()}") from None
    assert done.returncode == 0, (f"{' '.join(args)} exited {done.returncode}\nstdout:\n{done.stdout[-4000:]}\n"
                                  f"stderr:\n{done.stderr[-4000:]}\nserver log:\n{server.log()}")
    return done


# -- the server: a real `mixtral serve` process on the tiny checkpoint ----------------------------------
class Served:
    def __init__(self, url: str, log_path: Path) -> None:
        self.url, self.log_path = url, log_path  # url ends in /v1

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=WAIT_S) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    """`mixtral serve` in fp32 on 127.0.0.1 (a free port, an API key), its log in a file."""
    log_path = tmp_path_factory.mktemp("serve") / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k != "MIXTRAL_API_KEY"} | {"HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mixtral_cli", "serve", "-m", str(tiny_ckpt), "--port", "0",
                                 "--device", "cpu", "--dtype", "float32", "--api-key", KEY],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()  # the base URL is the first (and only) line on stdout
        if not url.startswith("http://"):
            proc.kill()
            proc.wait()
            raise AssertionError(f"no URL from mixtral serve: {url!r}\n{log_path.read_text()}")
        yield Served(url, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_client_versions():
    """The payloads this module relies on were captured from these versions."""
    for name, (dist, version) in CLIENTS.items():
        client(name)
        assert importlib.metadata.version(dist) == version, f"{dist} {importlib.metadata.version(dist)}, not {version}"


# -- llm ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_home(server, tmp_path_factory) -> Path:
    """A temp dir with llm's user dir: the server as an OpenAI-compatible model that takes schemas,
    its key from $OPENAI_API_KEY (`api_key_name`; without it llm sends 'Bearer DUMMY_KEY')."""
    home = tmp_path_factory.mktemp("llm")
    (home / "llm-user").mkdir()
    (home / "llm-user" / "extra-openai-models.yaml").write_text(
        f"- model_id: {LLM_MODEL}\n"
        f"  model_name: {SERVED}\n"
        f"  api_base: {server.url}\n"
        f"  api_key_name: mixtral\n"
        f"  supports_schema: true\n")
    return home


def llm(home: Path, server: Served, *args: str) -> str:
    return run_client([client("llm"), *args], client_env(home), home, server).stdout


def last_llm_log(home: Path, server: Served) -> dict:
    return json.loads(llm(home, server, "logs", "-n", "1", "--json"))[0]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_llm_prompt_gets_the_served_text_and_usage(server, llm_home, stream):
    import openai

    question = "Why is the sky blue?"
    ref = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=WAIT_S).chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=12)
    assert ref.choices[0].message.content
    out = llm(llm_home, server, "-m", LLM_MODEL, *([] if stream else ["--no-stream"]),
              "-o", "temperature", "0", "-o", "max_tokens", "12", question)
    assert out == ref.choices[0].message.content + "\n"  # llm prints the text and one newline
    logged = last_llm_log(llm_home, server)  # llm records the usage the server reported
    assert logged["response"] == ref.choices[0].message.content
    assert (logged["input_tokens"], logged["output_tokens"]) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)


# the schema forms llm sends as response_format json_schema; seeds chosen so that the tiny random
# model, sampling at 0.8 under the schema's grammar, closes the document well inside the context
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0,
                                                                               "maximum": 150}}}


@pytest.mark.parametrize(("schema_arg", "seed"), [("name, age int", "3"), (json.dumps(SCHEMA), "1")],
                         ids=["llm-dsl", "json-schema"])
def test_llm_schema_output_validates(server, llm_home, schema_arg, seed):
    schema = json.loads(llm(llm_home, server, "schemas", "dsl", schema_arg)) if schema_arg[0] != "{" else SCHEMA
    out = llm(llm_home, server, "-m", LLM_MODEL, "--schema", schema_arg, "-o", "temperature", "0.8",
              "-o", "seed", seed, "Invent a person: their name and age.")
    try:
        doc = json.loads(out)
    except json.JSONDecodeError as e:
        raise AssertionError(f"not JSON ({e}): {out!r}\nserver log:\n{server.log()}") from None
    jsonschema.validate(doc, schema)
    assert last_llm_log(llm_home, server)["schema_json"] == schema  # llm logs the schema it sent


def test_llm_json_object_option(server, llm_home):
    out = llm(llm_home, server, "-m", LLM_MODEL, "-o", "json_object", "1", "-o", "temperature", "0.8",
              "-o", "seed", "1", "Reply with a JSON object.")
    assert isinstance(json.loads(out), dict), out


# -- lm-evaluation-harness -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_eval_dir(tmp_path_factory, tiny_ckpt) -> Path:
    """The task (YAML + local JSONL) and a tokenizer dir that adds the BOS: the checkpoint's
    tokenizer.model and config.json with a one-line tokenizer_config.json."""
    d = tmp_path_factory.mktemp("lm-eval")
    (d / "tasks").mkdir()
    data = d / "tasks" / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (d / "tasks" / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    (d / "bos-tokenizer").mkdir()
    for name in ("tokenizer.model", "config.json"):
        shutil.copyfile(tiny_ckpt / name, d / "bos-tokenizer" / name)
    (d / "bos-tokenizer" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    return d


def test_autotokenizer_reads_a_checkpoint_dir_as_the_project_does(tiny_ckpt, lm_eval_dir):
    """What lm-eval's huggingface tokenizer backend does with a checkpoint dir (converting
    tokenizer.model needs protobuf): this project's ids, and a BOS only where a tokenizer_config.json
    asks for one."""
    from transformers import AutoTokenizer

    from mixtral_cli.checkpoints.tokenizer import Tokenizer

    ours = Tokenizer.from_file(tiny_ckpt / "tokenizer.model")
    plain = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    with_bos = AutoTokenizer.from_pretrained(str(lm_eval_dir / "bos-tokenizer"))
    texts = [f"Question: {q['question']}\nAnswer: {c}" for q in QUESTIONS for c in q["choices"]]
    for text in [*texts, "Answer:", " Paris", "  two  spaces\n\nand émoji 😀 中文", "tab\tend. "]:
        assert plain(text, add_special_tokens=False).input_ids == ours.encode(text), text
        assert plain(text).input_ids == ours.encode(text), text  # no BOS: nothing asks for it
        assert with_bos(text).input_ids == ours.encode(text, bos=True), text
        assert with_bos(text, add_special_tokens=False).input_ids == ours.encode(text), text
    assert (plain.bos_token_id, plain.eos_token_id) == (ours.bos_id, ours.eos_id)


def reference_loglikelihood(engine, context: str, continuation: str, bos: bool) -> tuple[float, bool]:
    """log P(continuation | context) and whether every continuation token is the argmax, as the
    project scores text (`engine.evaluate.window_logprobs`, what `mixtral perplexity` sums), on the
    tokens lm-eval builds (`TemplateLM._encode_pair`: the context's trailing spaces go to the
    continuation; the whole text is encoded and the context's token count cut off)."""
    from mixtral_cli.engine.evaluate import window_logprobs

    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    tok = engine.tokenizer
    prefix = [tok.bos_id] if bos else []
    whole = prefix + tok.encode(context + continuation)
    ctxlen = len(prefix + tok.encode(context))
    assert 0 < ctxlen < len(whole)
    with torch.no_grad():
        logp = torch.cat(list(window_logprobs(engine.model, whole)))  # [len - 1, V]: row p predicts token p + 1
    rows = logp[ctxlen - 1:len(whole) - 1].double()
    targets = torch.tensor(whole[ctxlen:])
    return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(dim=-1) == targets).all())


LM_EVAL_RUNS = {
    # model=<checkpoint dir> alone: tokenizer_backend=auto probes /tokenizer_info, then AutoTokenizer
    # reads the checkpoint dir (ids without a BOS)
    "checkpoint-dir": (lambda ckpt, d: f"model={ckpt}", [], False),
    # the documented way: the served name, a tokenizer that adds the BOS
    "bos": (lambda ckpt, d: f"model={SERVED},tokenizer={d / 'bos-tokenizer'},tokenizer_backend=huggingface,"
                            "add_bos_token=True", [], True),
    # several prompts (token-id lists) in one request, choices paired by index
    "batched": (lambda ckpt, d: f"model={SERVED},tokenizer={d / 'bos-tokenizer'},tokenizer_backend=huggingface,"
                                "add_bos_token=True", ["--batch_size", "4"], True),
}


@pytest.mark.parametrize("run", list(LM_EVAL_RUNS))
def test_lm_eval_scores_equal_the_projects_own(server, tiny_ckpt, lm_eval_dir, engine_fp32, run, tmp_path):
    model_args, extra, bos = LM_EVAL_RUNS[run]
    out_dir = tmp_path / "out"
    done = run_client([client("lm_eval"), "--model", "local-completions",
                       "--model_args", f"{model_args(tiny_ckpt, lm_eval_dir)},base_url={server.url}/completions,"
                                       "max_retries=1",
                       *extra, "--tasks", TASK, "--include_path", str(lm_eval_dir / "tasks"),
                       "--output_path", str(out_dir), "--log_samples"],
                      client_env(tmp_path), tmp_path, server)
    assert "API request failed" not in done.stderr + done.stdout, done.stderr[-4000:]
    samples_files = glob.glob(str(out_dir / "**" / f"samples_{TASK}_*.jsonl"), recursive=True)
    results_files = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    assert len(samples_files) == 1 and len(results_files) == 1, (samples_files, results_files)
    samples = sorted((json.loads(line) for line in Path(samples_files[0]).read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    assert [s["doc"] for s in samples] == QUESTIONS

    correct = 0
    for s in samples:
        args = [s["arguments"][f"gen_args_{i}"] for i in range(len(s["doc"]["choices"]))]
        got = [(float(r[0][0]), r[0][1] == "True") for r in s["resps"]]  # lm-eval logs them as strings
        want = [reference_loglikelihood(engine_fp32, a["arg_0"], a["arg_1"], bos) for a in args]
        for (ll, greedy), (ref_ll, ref_greedy), a in zip(got, want, args, strict=True):
            assert ll == pytest.approx(ref_ll, abs=1e-4), (a, ll, ref_ll)
            assert greedy == ref_greedy, (a, greedy, ref_greedy)
        correct += max(range(len(want)), key=lambda i: want[i][0]) == s["doc"]["answer"]
    results = json.loads(Path(results_files[0]).read_text())["results"][TASK]
    assert results["acc,none"] == pytest.approx(correct / len(QUESTIONS))


def test_lm_eval_request_gets_what_lm_eval_reads(server, tiny_ckpt, engine_fp32):
    """lm-eval's exact loglikelihood payload (two prompts, one request) answered with what
    `LocalCompletionsAPI.parse_logprobs` reads: a choice per prompt with its `index`, the echoed
    prompt's tokens and one generated token in `token_logprobs` (None first) and `top_logprobs`."""
    from mixtral_cli.engine.evaluate import window_logprobs

    tok = engine_fp32.tokenizer
    prompts = [[tok.bos_id, *tok.encode("Question: What is the capital of France?\nAnswer: Paris")],
               tok.encode("Answer: London")]
    status, body = server.post("/completions", {"model": str(tiny_ckpt), "prompt": prompts, "temperature": 0,
                                                "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
    assert status == 200, body
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for ids, c in zip(prompts, choices, strict=True):
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1, lp
        assert lp["token_logprobs"][0] is None
        with torch.no_grad():
            logp = torch.cat(list(window_logprobs(engine_fp32.model, ids)))
        want = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
        for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert isinstance(top, dict) and top and max(top.values()) >= value - 1e-6
