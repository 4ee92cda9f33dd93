"""`python -m serve` as a user runs it: one server subprocess on the demo model, driven by the
official `openai` client (and raw HTTP for what that client cannot send)."""

import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import openai
import pytest

pytestmark = pytest.mark.slow  # a JAX subprocess loading and compiling the demo model

_MAX_MODEL_LEN = 128
# The server drafts with the MTP module (speculative decoding), so every test here runs that path;
# `--prompt` mode, plain decoding, must print the server's greedy text.
_SERVER_FLAGS = ["--port", "0", "--max_num_seqs", "4", "--max_num_batched_tokens", "64", "--num_kv_pages", "64",
                 "--max_model_len", str(_MAX_MODEL_LEN), "--num_speculative_tokens", "1"]
_PROMPT = "Once upon a time"
_LONGEST = _MAX_MODEL_LEN - len(_PROMPT)  # the most tokens a request for _PROMPT may ask for


def _env() -> dict:
  # One CPU device: the 8 fake devices that tests/conftest.py asks for are for sharding tests.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  return env


@pytest.fixture(scope="module")
def server():
  """The base URL of a `python -m serve` subprocess, up for the whole module."""
  with tempfile.TemporaryFile(mode="w+") as stderr:
    proc = subprocess.Popen([sys.executable, "-m", "serve", *_SERVER_FLAGS], stdout=subprocess.PIPE, stderr=stderr,
                            text=True, env=_env())
    try:
      line = proc.stdout.readline()  # blocks until ready, or "" if it exits first
      match = re.fullmatch(r"serve: listening on (http://\S+)\n", line)
      if match is None:
        proc.wait(timeout=30)
        stderr.seek(0)
        pytest.fail(f"server did not start (exit {proc.returncode}): {line!r}\n{stderr.read()[-4000:]}")
      yield match.group(1)
    finally:
      proc.terminate()
      try:
        assert proc.wait(timeout=30) == 0, "SIGTERM should stop the server cleanly"
      finally:
        proc.kill()
        proc.stdout.close()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client):
  return client.models.list().data[0].id


def _metrics(server: str) -> dict[str, float]:
  text = urllib.request.urlopen(f"{server}/metrics", timeout=30).read().decode()
  samples = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      name, value = line.rsplit(" ", 1)
      samples[name] = float(value)
  return samples


def _post(server: str, path: str, data: bytes, content_type: str = "application/json") -> tuple[int, dict]:
  request = urllib.request.Request(f"{server}{path}", data=data, headers={"Content-Type": content_type})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.load(response)
  except urllib.error.HTTPError as err:
    return err.code, json.load(err)


def test_models_and_health(server, client, model_name):
  models = client.models.list().data
  assert [m.id for m in models] == [model_name]
  assert models[0].model_extra["max_model_len"] == _MAX_MODEL_LEN
  with urllib.request.urlopen(f"{server}/health", timeout=30) as response:
    assert response.status == 200


def test_completion_and_its_stream_agree(client, model_name):
  full = client.completions.create(model=model_name, prompt=_PROMPT, max_tokens=8, temperature=0)
  choice = full.choices[0]
  assert full.object == "text_completion" and full.id.startswith("cmpl-")
  assert choice.text and choice.finish_reason in ("stop", "length")
  assert full.usage.prompt_tokens > 0 and 0 < full.usage.completion_tokens <= 8
  assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

  chunks = list(client.completions.create(model=model_name, prompt=_PROMPT, max_tokens=8, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
  text_chunks, usage_chunk = chunks[:-1], chunks[-1]
  assert "".join(c.choices[0].text for c in text_chunks) == choice.text
  assert [c.choices[0].finish_reason for c in text_chunks] == [None] * (len(text_chunks) - 1) + [choice.finish_reason]
  assert usage_chunk.choices == [] and usage_chunk.usage == full.usage
  assert len({c.id for c in chunks}) == 1


def test_token_id_prompt(client, model_name):
  ids = [72, 101, 108, 108, 111]
  out = client.completions.create(model=model_name, prompt=ids, max_tokens=4, temperature=0)
  assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens > 0


def test_stop_string_cuts_the_text(client, model_name):
  text = client.completions.create(model=model_name, prompt=_PROMPT, max_tokens=8, temperature=0).choices[0].text
  stop = text[2:4]
  if len(stop) < 2 or stop.isspace():
    pytest.skip(f"the demo model's greedy text {text!r} has no usable stop string")
  cut = client.completions.create(model=model_name, prompt=_PROMPT, max_tokens=8, temperature=0, stop=[stop])
  assert cut.choices[0].text == text[:text.index(stop)]
  assert cut.choices[0].finish_reason == "stop"


def test_chat_and_its_stream_agree(client, model_name):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
  full = client.chat.completions.create(model=model_name, messages=messages, max_tokens=8, temperature=0)
  assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
  assert full.choices[0].message.role == "assistant"
  assert full.choices[0].finish_reason in ("stop", "length")
  assert 0 < full.usage.completion_tokens <= 8

  chunks = list(client.chat.completions.create(model=model_name, messages=messages, max_tokens=8, temperature=0,
                                               stream=True))
  assert all(c.object == "chat.completion.chunk" for c in chunks)
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
  assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
  assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_concurrent_requests(client, model_name):
  prompts = [f"{_PROMPT} {i}" for i in range(8)]

  def complete(prompt):
    return client.completions.create(model=model_name, prompt=prompt, max_tokens=6, temperature=0)

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    together = list(pool.map(complete, prompts))
  for prompt, out in zip(prompts, together):
    assert out.choices[0].finish_reason in ("stop", "length")
    assert 0 < out.usage.completion_tokens <= 6
  # Batching must not change a greedy request's output.
  assert together[3].choices[0].text == complete(prompts[3]).choices[0].text


def test_closed_stream_frees_its_sequence(server, client, model_name):
  aborted = _metrics(server).get('fireflyer:request_success_total{finished_reason="abort"}', 0)
  stream = client.completions.create(model=model_name, prompt=_PROMPT, max_tokens=_LONGEST, temperature=0,
                                     stream=True, extra_body={"ignore_eos": True})
  for i, _ in enumerate(stream):
    if i == 1:
      break
  stream.close()
  samples = _wait_for_metrics(server, lambda s: s["fireflyer:num_requests_running"] == 0 and
                              s.get('fireflyer:request_success_total{finished_reason="abort"}', 0) == aborted + 1)
  assert samples["fireflyer:kv_cache_usage_perc"] == 0


def test_client_hanging_up_frees_its_sequence(server):
  aborted = _metrics(server).get('fireflyer:request_success_total{finished_reason="abort"}', 0)
  body = json.dumps({"prompt": _PROMPT, "max_tokens": _LONGEST, "ignore_eos": True}).encode()
  host, port = server.removeprefix("http://").split(":")
  with socket.create_connection((host, int(port)), timeout=30) as conn:
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    # Hang up once the request is in the engine.
    _wait_for_metrics(server, lambda s: s["fireflyer:num_requests_running"] + s["fireflyer:num_requests_waiting"])
  _wait_for_metrics(server, lambda s: s["fireflyer:num_requests_running"] == 0 and
                    s.get('fireflyer:request_success_total{finished_reason="abort"}', 0) == aborted + 1)


def _wait_for_metrics(server: str, predicate, timeout_s: float = 20.0) -> dict[str, float]:
  deadline = time.monotonic() + timeout_s
  while not predicate(samples := _metrics(server)):
    assert time.monotonic() < deadline, f"metrics never got there: {samples}"
    time.sleep(0.05)
  return samples


@pytest.mark.parametrize("kwargs, error, param", [
    ({"model": "no-such-model"}, openai.NotFoundError, "model"),
    ({"n": 2}, openai.BadRequestError, "n"),
    ({"temperature": -1}, openai.BadRequestError, "temperature"),
    ({"top_p": 1.5}, openai.BadRequestError, "top_p"),
    ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    ({"seed": -3}, openai.BadRequestError, "seed"),
    ({"stop": [""]}, openai.BadRequestError, "stop"),
    ({"extra_body": {"top_k": "ten"}}, openai.BadRequestError, "top_k"),
    ({"echo": True}, openai.BadRequestError, "echo"),
    ({"prompt": "x" * (2 * _MAX_MODEL_LEN)}, openai.BadRequestError, "prompt"),
    ({"prompt": ""}, openai.BadRequestError, "prompt"),
    ({"max_tokens": _MAX_MODEL_LEN}, openai.BadRequestError, "prompt"),  # prompt plus max_tokens past the limit
    ({"prompt": [[1, 2], [3]]}, openai.BadRequestError, "prompt"),
])
def test_bad_completion_requests(client, model_name, kwargs, error, param):
  request = {"model": model_name, "prompt": "hi", "max_tokens": 2, **kwargs}
  with pytest.raises(error) as info:
    client.completions.create(**request)
  body = info.value.body
  assert body["param"] == param and body["message"] and body["type"] == "invalid_request_error"
  if "prompt" in kwargs and len(kwargs["prompt"]) > _MAX_MODEL_LEN:
    assert body["code"] == "context_length_exceeded"


@pytest.mark.parametrize("messages", [[], [{"content": "no role"}], [{"role": "user", "content": 5}]])
def test_bad_chat_requests(client, model_name, messages):
  with pytest.raises(openai.BadRequestError) as info:
    client.chat.completions.create(model=model_name, messages=messages, max_tokens=2)
  assert info.value.body["param"] == "messages"


@pytest.mark.parametrize("data, content_type, needle", [
    (b'{"prompt": "hi",', "application/json", "malformed JSON"),
    (b'{"prompt": "hi"}', "text/plain", "Content-Type"),
    (b'["hi"]', "application/json", "JSON object"),
    (b'{"max_tokens": 2}', "application/json", "prompt is required"),
])
def test_malformed_bodies(server, data, content_type, needle):
  status, body = _post(server, "/v1/completions", data, content_type)
  assert status == 400 and needle in body["error"]["message"]


def test_unknown_route_is_a_json_404(server):
  status, body = _post(server, "/v1/nothing", b"{}")
  assert status == 404 and body["error"]["type"] == "invalid_request_error"


def test_metrics(server, client, model_name):
  client.completions.create(model=model_name, prompt=_PROMPT, max_tokens=4, temperature=0)
  samples = _metrics(server)
  for name in ("fireflyer:num_requests_running", "fireflyer:num_requests_waiting", "fireflyer:kv_cache_usage_perc",
               "fireflyer:generation_throughput_toks_per_s", "fireflyer:prefix_cache_queries_total",
               "fireflyer:prefix_cache_hits_total"):
    assert name in samples, name
  assert samples["fireflyer:prompt_tokens_total"] > 0
  assert samples["fireflyer:generation_tokens_total"] >= 4
  assert samples["fireflyer:time_to_first_token_seconds_count"] >= 1
  assert samples["fireflyer:inter_token_latency_seconds_count"] >= 1
  assert samples['fireflyer:time_to_first_token_seconds_bucket{le="+Inf"}'] >= 1
  assert samples["fireflyer:generation_throughput_toks_per_s"] > 0  # within the 10 s window
  drafts = samples["fireflyer:spec_decode_num_draft_tokens_total"]
  assert 0 < drafts and 0 <= samples["fireflyer:spec_decode_num_accepted_tokens_total"] <= drafts


def test_still_healthy_after_the_errors(server, client, model_name):
  with urllib.request.urlopen(f"{server}/health", timeout=30) as response:
    assert response.status == 200
  assert client.completions.create(model=model_name, prompt="hi", max_tokens=2).choices[0].text is not None


def test_prompt_mode_prints_the_speculative_servers_greedy_completion(client, model_name):
  expected = client.completions.create(model=model_name, prompt=_PROMPT, max_tokens=8, temperature=0).choices[0].text
  result = subprocess.run([sys.executable, "-m", "serve", "--prompt", _PROMPT, "--max_tokens", "8",
                           "--max_model_len", str(_MAX_MODEL_LEN)], capture_output=True, text=True, timeout=300,
                          env=_env())
  assert result.returncode == 0, result.stderr[-4000:]
  assert result.stdout == expected + "\n"


def test_unknown_flag_is_a_usage_error():
  result = subprocess.run([sys.executable, "-m", "serve", "--no_such_flag"], capture_output=True, text=True,
                          timeout=120, env=_env())
  assert result.returncode != 0 and "no_such_flag" in result.stderr


@pytest.mark.parametrize("flags, needle", [
    (["--kv_store", "3fs://127.0.0.1:1/kv", "--kv_store_index", "memory"], "--kv_store: cannot use the storage cluster"),
    (["--kv_store", "/local/dir", "--kv_store_index", "memory"], "--kv_store must be 3fs://HOST:PORT/ROOT"),
    (["--kv_store", "3fs://127.0.0.1:1/kv"], "--kv_store needs --kv_store_index"),
    (["--kv_store", "3fs://127.0.0.1:1/kv", "--kv_store_index", "redis://x"], "--kv_store_index: a KV engine must be"),
    (["--kv_store_index", "memory"], "need --kv_store"),
    (["--kv_store", "3fs://127.0.0.1:1/kv", "--kv_store_index", "memory", "--kv_store_pages", "0"],
     "--kv_store_pages must be >= 1"),
    (["--kv_store", "3fs://127.0.0.1:1/kv", "--kv_store_index", "memory", "--num_speculative_tokens", "2"],
     "--num_speculative_tokens must be 0 or 1"),
])
def test_bad_kv_store_flags_are_usage_errors(flags, needle):
  result = subprocess.run([sys.executable, "-m", "serve", "--prompt", "x", *flags], capture_output=True, text=True,
                          timeout=300, env=_env())
  assert result.returncode != 0 and needle in result.stderr, result.stderr[-3000:]


def test_prompt_mode_with_a_kv_store_on_a_cluster(tmp_path):
  import storage
  from tests.storage.local_cluster import LocalCluster
  with LocalCluster(tmp_path / "cluster", gc_delay_s=0.0) as cluster:
    args = ["--prompt", _PROMPT, "--max_tokens", "8", "--max_model_len", str(_MAX_MODEL_LEN)]
    plain = subprocess.run([sys.executable, "-m", "serve", *args], capture_output=True, text=True, timeout=300,
                           env=_env())
    stored = subprocess.run([sys.executable, "-m", "serve", *args, "--kv_store", f"3fs://{cluster.address}/serve-kv",
                             "--kv_store_index", f"sqlite:{tmp_path / 'index.db'}", "--kv_store_pages", "16"],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert plain.returncode == 0 and stored.returncode == 0, stored.stderr[-3000:]
    assert stored.stdout == plain.stdout
    with storage.connect(cluster.address) as client:
      assert client.exists("/serve-kv")  # the store was made on the cluster, at the flag's root
