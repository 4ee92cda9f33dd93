"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health
and Prometheus /metrics, on aiohttp over `AsyncLLM`.

Every failure is answered in OpenAI's error shape, `{"error": {"message", "type", "param",
"code"}}`, and the server keeps running. A client that disconnects mid-request has its request
aborted, which frees its sequence's KV pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from absl import logging
from aiohttp import web

from serve.async_llm import AsyncLLM
from serve.metrics import Metrics
from serve.sampling_params import SamplingParams

# OpenAI parameters this server does not implement: refused when set to anything but their
# default, rather than silently ignored.
_UNSUPPORTED = {"echo": (None, False), "logprobs": (None, False), "top_logprobs": (None,), "best_of": (None, 1),
                "suffix": (None,), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                "logit_bias": (None, {}), "tools": (None, []), "response_format": (None, {"type": "text"})}
_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "max_tokens", "stop", "seed", "ignore_eos")


class ApiError(Exception):
  """A request the server refuses, answered as OpenAI's error JSON."""

  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
               error_type: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

  def response(self) -> web.Response:
    error = {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
    return web.json_response({"error": error}, status=self.status)


_LLM = web.AppKey("llm", AsyncLLM)
_METRICS = web.AppKey("metrics", Metrics)
_CREATED = web.AppKey("created", int)
_STALL_S = web.AppKey("health_stall_s", float)


def create_app(engine: Any, *, health_stall_s: float = 600.0) -> web.Application:
  """The aiohttp app serving `engine`, which it runs on an `AsyncLLM` thread from now on.

  Args:
    engine: an `LLMEngine`; nothing else may call it once this returns.
    health_stall_s: `/health` answers 503 while one engine step has run longer than this (a
      hung device or a deadlock; a first use of a shape compiles, which takes seconds to minutes).
  """
  if not health_stall_s > 0:
    raise ValueError(f"health_stall_s must be > 0, got {health_stall_s}")
  metrics = Metrics()
  llm = AsyncLLM(engine, observer=metrics)
  metrics.watch(llm)
  app = web.Application(middlewares=[_errors_as_json])
  app[_LLM], app[_METRICS], app[_CREATED], app[_STALL_S] = llm, metrics, int(time.time()), float(health_stall_s)
  app.router.add_post("/v1/completions", _completions)
  app.router.add_post("/v1/chat/completions", _chat_completions)
  app.router.add_get("/v1/models", _models)
  app.router.add_get("/health", _health)
  app.router.add_get("/metrics", _metrics)

  async def shutdown(app: web.Application) -> None:
    # Joins the engine thread, which may be mid-step; a hung step (what /health reports) is not waited out.
    if not await asyncio.to_thread(app[_LLM].shutdown, 60.0):
      logging.warning("the engine step still runs after 60 s; stopping without it")
    flush = getattr(engine, "flush_kv_store", None)  # spilled pages still queued for the KV-cache store
    if flush is not None and not await asyncio.to_thread(flush, 30.0):
      logging.warning("KV-cache store: spilled pages still queued after 30 s are dropped")

  app.on_cleanup.append(shutdown)
  return app


async def serve(engine: Any, *, host: str = "127.0.0.1", port: int = 8000,
                on_ready: Callable[[str], None] | None = None, health_stall_s: float = 600.0) -> None:
  """Serves `engine` over HTTP until SIGINT/SIGTERM or until the calling task is cancelled.

  Args:
    engine: an `LLMEngine`.
    host, port: where to listen; port 0 picks a free one.
    on_ready: called with the server's URL once it accepts connections.
    health_stall_s: see `create_app`.
  """
  # handler_cancellation: a client that hangs up cancels its handler, which aborts its request.
  runner = web.AppRunner(create_app(engine, health_stall_s=health_stall_s), handler_cancellation=True,
                         access_log=None)
  await runner.setup()
  loop, stop, handled = asyncio.get_running_loop(), asyncio.Event(), []
  try:
    await web.TCPSite(runner, host, port).start()
    for signum in (signal.SIGINT, signal.SIGTERM):
      with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
        loop.add_signal_handler(signum, stop.set)
        handled.append(signum)
    if on_ready is not None:
      on_ready(f"http://{host}:{runner.addresses[0][1]}")
    await stop.wait()
  finally:
    for signum in handled:
      loop.remove_signal_handler(signum)
    await runner.cleanup()


@web.middleware
async def _errors_as_json(request: web.Request, handler) -> web.StreamResponse:
  try:
    return await handler(request)
  except ApiError as err:
    return err.response()
  except web.HTTPException as err:  # aiohttp's own 404/405/413, in OpenAI's shape
    if err.status < 400:
      raise
    return ApiError(err.status, err.reason, error_type="invalid_request_error" if err.status < 500
                    else "server_error").response()
  except (asyncio.CancelledError, ConnectionResetError):
    raise
  except Exception as err:  # noqa: BLE001 - one bad request must not take the server down
    logging.exception("%s %s failed", request.method, request.path)
    return ApiError(500, f"internal error: {err}", error_type="server_error").response()


async def _models(request: web.Request) -> web.Response:
  llm = request.app[_LLM]
  model = {"id": llm.model_name, "object": "model", "created": request.app[_CREATED], "owned_by": "fireflyer",
           "max_model_len": llm.max_model_len}
  return web.json_response({"object": "list", "data": [model]})


async def _health(request: web.Request) -> web.Response:
  llm = request.app[_LLM]
  if not llm.is_running:
    raise ApiError(503, "the engine thread has stopped", error_type="server_error")
  if (seconds := llm.step_seconds()) > request.app[_STALL_S]:
    raise ApiError(503, f"an engine step has run for {seconds:.0f} s (more than {request.app[_STALL_S]:g} s)",
                   error_type="server_error")
  return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
  body, content_type = request.app[_METRICS].render()
  return web.Response(body=body, headers={"Content-Type": content_type})


async def _completions(request: web.Request) -> web.StreamResponse:
  llm = request.app[_LLM]
  body = await _json_body(request)
  _check_model(body, llm)
  prompt = _prompt(body)
  params = _sampling_params(body, max_tokens=_or(body.get("max_tokens"), 16))  # OpenAI's default
  stream, include_usage = _stream_flags(body)
  request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

  def envelope(choices: list[dict]) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": llm.model_name,
            "choices": choices}

  def choice(text: str, finish_reason: str | None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

  outputs = llm.generate(prompt, params, request_id)
  async with contextlib.aclosing(outputs):
    first = await _first_output(outputs, param="prompt")
    if not stream:
      final = await _last_output(first, outputs)
      return web.json_response(envelope([choice(final.text, final.finish_reason)]) | {"usage": final.usage})
    return await _stream_sse(request, first, outputs, include_usage, envelope,
                             lambda out, finish: choice(out.new_text, finish))


async def _chat_completions(request: web.Request) -> web.StreamResponse:
  llm = request.app[_LLM]
  body = await _json_body(request)
  _check_model(body, llm)
  messages = _messages(body)
  max_tokens = _or(body.get("max_completion_tokens"), body.get("max_tokens"))  # None: to the model's limit
  params = _sampling_params(body, max_tokens=max_tokens)
  stream, include_usage = _stream_flags(body)
  try:
    prompt = llm.apply_chat_template(messages)
  except ValueError as err:
    raise ApiError(400, str(err), param="messages") from None
  request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

  def envelope(choices: list[dict]) -> dict:
    kind = "chat.completion.chunk" if stream else "chat.completion"
    return {"id": request_id, "object": kind, "created": created, "model": llm.model_name, "choices": choices}

  def delta(out, finish: str | None) -> dict:
    return {"index": 0, "delta": {"content": out.new_text} if out.new_text else {}, "logprobs": None,
            "finish_reason": finish}

  outputs = llm.generate(prompt, params, request_id)
  async with contextlib.aclosing(outputs):
    first = await _first_output(outputs, param="messages")
    if not stream:
      final = await _last_output(first, outputs)
      message = {"role": "assistant", "content": final.text}
      choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": final.finish_reason}
      return web.json_response(envelope([choice]) | {"usage": final.usage})
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return await _stream_sse(request, first, outputs, include_usage, envelope, delta, first_chunk=role)


async def _first_output(outputs: AsyncIterator, *, param: str):
  """The request's first output; the engine's refusal (too long, empty, ...) becomes a 400."""
  try:
    return await anext(outputs)
  except ValueError as err:
    message = str(err)
    code = "context_length_exceeded" if "too long" in message else None
    raise ApiError(400, message, param=param, code=code) from None
  except RuntimeError as err:
    raise ApiError(500, str(err), error_type="server_error") from None


async def _last_output(first, outputs: AsyncIterator):
  final = first
  try:
    async for final in outputs:
      pass
  except RuntimeError as err:
    raise ApiError(500, str(err), error_type="server_error") from None
  return final


async def _stream_sse(request: web.Request, first, outputs: AsyncIterator, include_usage: bool,
                      envelope: Callable[[list[dict]], dict], choice: Callable[[Any, str | None], dict],
                      first_chunk: dict | None = None) -> web.StreamResponse:
  """Sends server-sent events: one chunk per output that adds text or finishes, an optional usage
  chunk, then `data: [DONE]`. A client that hung up ends it quietly (the caller aborts)."""
  response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
  await response.prepare(request)

  async def send(chunk: dict) -> None:
    if include_usage:
      chunk.setdefault("usage", None)  # OpenAI: null on every chunk but the last
    await response.write(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode())

  try:
    if first_chunk is not None:
      await send(envelope([first_chunk]))
    out = first
    while True:
      if out.new_text or out.finished:
        await send(envelope([choice(out, out.finish_reason if out.finished else None)]))
      if out.finished:
        break
      out = await anext(outputs)
    if include_usage:
      await send(envelope([]) | {"usage": out.usage})
    await response.write(b"data: [DONE]\n\n")
  except ConnectionResetError:
    logging.info("client of %s went away mid-stream", request.path)
  except RuntimeError as err:  # the engine failed mid-stream: say so in-band, headers are sent
    error = {"message": str(err), "type": "server_error", "param": None, "code": None}
    with contextlib.suppress(ConnectionResetError):
      await response.write(f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode())
  return response


async def _json_body(request: web.Request) -> dict:
  if request.content_type != "application/json":
    raise ApiError(400, f"Content-Type must be application/json, got {request.content_type!r}")
  try:
    body = json.loads(await request.text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ApiError(400, f"malformed JSON body: {err}") from None
  if not isinstance(body, dict):
    raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
  return body


def _check_model(body: dict, llm: AsyncLLM) -> None:
  model = body.get("model")
  if model is not None and model != llm.model_name:
    raise ApiError(404, f"The model `{model}` does not exist; this server serves `{llm.model_name}`.",
                   param="model", code="model_not_found")


def _prompt(body: dict) -> str | list[int]:
  if "prompt" not in body:
    raise ApiError(400, "prompt is required", param="prompt")
  prompt = body["prompt"]
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # a batch of one
  if isinstance(prompt, str):
    return prompt
  if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
    return prompt
  raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", param="prompt")


def _messages(body: dict) -> list[dict]:
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ApiError(400, "messages must be a non-empty list", param="messages")
  result = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
      raise ApiError(400, f"messages[{i}] must be an object with a string role", param="messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones
      if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
      content = "".join(p["text"] for p in content)
    elif content is None:
      content = ""
    elif not isinstance(content, str):
      raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
    result.append({"role": message["role"], "content": content})
  return result


def _sampling_params(body: dict, *, max_tokens) -> SamplingParams:
  for name, defaults in _UNSUPPORTED.items():
    if body.get(name) not in defaults:
      raise ApiError(400, f"{name} is not supported by this server", param=name)
  if body.get("n") not in (None, 1):
    raise ApiError(400, f"n must be 1 (one choice per request), got {body.get('n')!r}", param="n")
  stop = body.get("stop")
  if stop is None:
    stop = ()
  elif isinstance(stop, str):
    stop = (stop,)
  elif not isinstance(stop, list):
    raise ApiError(400, f"stop must be a string or a list of strings, got {stop!r}", param="stop")
  # null means the default, as in OpenAI's API; top_k -1 means "all" as in vLLM.
  top_k = body.get("top_k")
  kwargs = {"temperature": _or(body.get("temperature"), 1.0), "top_p": _or(body.get("top_p"), 1.0),
            "top_k": 0 if top_k in (None, -1) else top_k, "max_tokens": max_tokens, "stop": tuple(stop),
            "seed": body.get("seed"), "ignore_eos": _or(body.get("ignore_eos"), False)}
  try:
    return SamplingParams(**kwargs)
  except ValueError as err:
    message = str(err)
    param = message.split(" ", 1)[0]
    raise ApiError(400, message, param=param if param in _SAMPLING_FIELDS else None) from None


def _or(value, default):
  return default if value is None else value


def _stream_flags(body: dict) -> tuple[bool, bool]:
  stream = _or(body.get("stream"), False)
  if not isinstance(stream, bool):
    raise ApiError(400, f"stream must be a boolean, got {stream!r}", param="stream")
  options = _or(body.get("stream_options"), {})
  if not isinstance(options, dict) or not isinstance(_or(options.get("include_usage"), False), bool):
    raise ApiError(400, "stream_options must be an object with a boolean include_usage", param="stream_options")
  return stream, bool(options.get("include_usage")) and stream
