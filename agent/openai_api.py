"""OpenAI-compatible routes for a causal-lm portfolio, the interface llama.cpp's server and Ollama give.

POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/<name>]. `stream: true` answers
server-sent events (`data: {...}` chunks, then `data: [DONE]`) over chunked transfer. Fields OpenAI
clients send by default (n=1, logprobs=null, presence_penalty=0, ...) are taken when they ask for the
default and refused with a 400 naming them when they ask for what this server does not do; unknown
fields are refused too. `top_k` is an extension. Errors use OpenAI's shape: {"error": {"message", "type",
"param", "code"}}.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime
from functools import lru_cache
from http import HTTPStatus

from agent.generate import MAX_NEW_TOKENS
from agent.http_api import HttpError
from agent.runtime import InferenceError
from agent.sampling import StopStrings, sampler_from, stop_strings
from agent.tokenizer import INSTALL_TOKENIZERS, prompt_ids

log = logging.getLogger("edgeshift.openai")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
FINISH_REASONS = {"eos": "stop", "stop": "stop", "max_tokens": "length", "length": "length"}
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)

_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
           "user", "metadata"}  # user and metadata only inform: taken and ignored
_TAKEN = {"completions": _COMMON | {"prompt"}, "chat": _COMMON | {"messages", "max_completion_tokens"}}
# Fields clients send with their default value: accepted at one of these values, refused at any other.
_DEFAULT_ONLY = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logprobs": (False,), "top_logprobs": (0,),
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "response_format": ({"type": "text"},),
    "tools": ([],), "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False), "functions": ([],),
    "function_call": ("none", "auto"), "store": (False,), "service_tier": ("auto", "default"),
    "modalities": (["text"],), "reasoning_effort": (), "prediction": (), "audio": (),
}
_COMPLETION_ONLY = {"best_of", "echo", "suffix"}


def get(handler, parts: list[str]) -> tuple[HTTPStatus, dict]:
    agent = handler.agent
    try:
        if parts == ["v1", "models"]:
            return HTTPStatus.OK, {"object": "list", "data": [_model_card(agent)]}
        if len(parts) == 3 and parts[:2] == ["v1", "models"]:
            _check_model(agent, parts[2])
            return HTTPStatus.OK, _model_card(agent)
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {handler.path}")
    except HttpError as error:
        return error.status, _error(error)


def post(handler, parts: list[str]) -> tuple[HTTPStatus, dict | None]:
    """The answer, or (200, None) when it was streamed to the client already."""
    kind = {("v1", "completions"): "completions", ("v1", "chat", "completions"): "chat"}.get(tuple(parts))
    try:
        if kind is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {handler.path}")
        body, binary = handler._body()
        if binary:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"/v1/{'/'.join(parts[1:])} takes a JSON body only")
        handler._ready()
        return _complete(handler, kind, body)
    except HttpError as error:
        return error.status, _error(error)


def _complete(handler, kind: str, body: dict) -> tuple[HTTPStatus, dict | None]:
    agent = handler.agent
    language_model = agent.manifest.language_model
    if language_model is None:
        raise _bad(f"'{agent.name}' is a {agent.manifest.task} model; /v1/{kind} needs a causal-lm portfolio")
    _check_fields(body, kind)
    if body.get("model") is not None:
        _check_model(agent, _typed(body, "model", str, "a string"))
    stream = _typed(body, "stream", bool, "true or false") or False
    include_usage = _include_usage(body.get("stream_options"), stream)
    try:
        sampler = sampler_from(body, default_temperature=1.0)  # OpenAI's default: sampling
        stop = stop_strings(body.get("stop"))
    except InferenceError as error:
        raise _bad(str(error)) from None
    if agent.codec is None:
        raise _bad(INSTALL_TOKENIZERS if agent.portfolio.tokenizer_path is not None else
                   f"'{agent.name}' ships no tokenizer; the /v1 routes speak text: use /v2/models/{agent.name}/generate "
                   "with input_ids")
    if kind == "chat":
        ids = agent.codec.encode(_chat_prompt(agent, body.get("messages")), add_special_tokens=False)
        max_tokens = _max_tokens(body, ("max_tokens", "max_completion_tokens"),
                                 min(language_model.context_length, MAX_NEW_TOKENS))
    else:
        try:
            ids = prompt_ids(_prompt(body.get("prompt")), agent.portfolio.tokenizer_path, agent.codec)
        except InferenceError as error:
            raise _bad(str(error)) from None
        max_tokens = _max_tokens(body, ("max_tokens",), COMPLETION_DEFAULT_MAX_TOKENS)
    reply = _Reply(agent.name, kind)
    if stream:
        _Stream(handler, reply, StopStrings(stop), include_usage).run(ids, max_tokens, sampler, stop)
        return HTTPStatus.OK, None
    try:
        result = agent.generate(ids, max_new_tokens=max_tokens, sampler=sampler, stop=stop)
    except InferenceError as error:
        raise _bad(str(error)) from None
    answer = reply.whole(result.text, FINISH_REASONS[result.stop_reason], result.variant)
    answer["usage"] = _usage(len(ids), len(result.new_ids))
    return HTTPStatus.OK, answer


class _Reply:
    """The JSON objects of one answer: whole, or as stream chunks that share its id and creation time."""

    def __init__(self, model: str, kind: str):
        self.model, self.kind = model, kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def whole(self, text: str, finish_reason: str, variant: str) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("chat.completion" if self.kind == "chat" else "text_completion", [choice], variant)

    def chunk(self, delta: dict | str, finish_reason: str | None, variant: str | None) -> dict:
        """delta: the chat delta object, or a completion's new text."""
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion", [choice], variant)

    def usage_chunk(self, usage: dict, variant: str) -> dict:
        return {**self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion", [], variant),
                "usage": usage}

    def _envelope(self, kind: str, choices: list, variant: str | None) -> dict:
        # system_fingerprint names the variant that answered: what the same seed reproduces on.
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": variant, "choices": choices}


class _Stream:
    """Server-sent events of one generation. Headers leave with the first token, so that a request the
    generation refuses before its first token is still an ordinary 400."""

    def __init__(self, handler, reply: _Reply, stops: StopStrings, include_usage: bool):
        self.handler, self.reply, self.stops, self.include_usage = handler, reply, stops, include_usage
        self.chunked = handler.request_version != "HTTP/1.0"
        self.started = False
        self.new_ids: list[int] = []
        self.sent = 0  # characters of the answer's text already sent

    def run(self, ids: list[int], max_tokens: int, sampler, stop: tuple[str, ...]) -> None:
        agent, handler, reply = self.handler.agent, self.handler, self.reply

        # Chunks before the last name no variant (system_fingerprint null): generate tells which one answered
        # only at the end, and the active one may have changed since the generation took its own.
        def on_step(step: int, token: int) -> None:
            if not self.started:
                self._start()
                if reply.kind == "chat":
                    self._event(reply.chunk({"role": "assistant", "content": ""}, None, None))
            self.new_ids.append(token)
            delta = self._settled_delta()
            if delta:
                self._event(reply.chunk(self._delta(delta), None, None))

        try:
            result = agent.generate(ids, max_new_tokens=max_tokens, on_step=on_step, sampler=sampler, stop=stop)
            rest = result.text[self.sent:]
            last = self._delta(rest) if rest or reply.kind == "completions" else {}
            self._event(reply.chunk(last, FINISH_REASONS[result.stop_reason], result.variant))
            if self.include_usage:
                self._event(reply.usage_chunk(_usage(len(ids), len(result.new_ids)), result.variant))
            self._send(b"data: [DONE]\n\n")
            self._end()
        except _CLIENT_GONE:
            log.info("the client left a stream after %d tokens; its generation stopped", len(self.new_ids))
            handler.close_connection = True
        except InferenceError as error:
            if not self.started:
                raise _bad(str(error)) from None
            self._fail(str(error))
        except Exception as error:  # a bug after the headers left: end the stream with it, never a second response
            if not self.started:
                raise
            log.exception("stream failed: %s %s", handler.command, handler.path)
            self._fail(f"{type(error).__name__}: {error}")

    def _settled_delta(self) -> str:
        text = self.handler.agent.codec.decode(self.new_ids)
        end = self.stops.settled(text)
        delta = text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    def _delta(self, text: str) -> dict | str:
        return {"content": text} if self.reply.kind == "chat" else text

    def _start(self) -> None:
        handler = self.handler
        handler.send_response(HTTPStatus.OK)
        handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.send_header("Cache-Control", "no-cache")
        if self.chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:  # an HTTP/1.0 client reads the stream until the connection closes
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        self.started = True

    def _event(self, payload: dict) -> None:
        self._send(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _send(self, data: bytes) -> None:
        wfile = self.handler.wfile
        wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        wfile.flush()  # the handler's writes are buffered: each event leaves now

    def _end(self) -> None:
        if self.chunked:
            self.handler.wfile.write(b"0\r\n\r\n")
            self.handler.wfile.flush()

    def _fail(self, message: str) -> None:
        try:
            self._event(_error(_bad(message)))
            self._send(b"data: [DONE]\n\n")
            self._end()
        except _CLIENT_GONE:
            self.handler.close_connection = True


# ---------------------------------------------------------------------------------------------- request fields


def _check_fields(body: dict, kind: str) -> None:
    for key, value in body.items():
        if key in _TAKEN[kind]:
            continue
        if key not in _DEFAULT_ONLY or (kind == "chat" and key in _COMPLETION_ONLY):
            raise _bad(f"unknown field '{key}' for /v1/{'chat/completions' if kind == 'chat' else 'completions'}",
                       param=key)
        if value is not None and not any(_same(value, default) for default in _DEFAULT_ONLY[key]):
            accepted = " or ".join(json.dumps(v) for v in (None, *_DEFAULT_ONLY[key]))
            raise _bad(f"'{key}': {json.dumps(value)} is not supported by this server; it takes {accepted} only",
                       param=key)


def _same(value, default) -> bool:
    """Equal and of the same JSON type (false is not 0, 0.0 is 0)."""
    number = (int, float)
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default
    if isinstance(default, number):
        return isinstance(value, number) and value == default
    return type(value) is type(default) and value == default


def _typed(body: dict, key: str, kind: type, what: str):
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise _bad(f"'{key}' must be {what}, got {json.dumps(value)}", param=key)
    return value


def _include_usage(options, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise _bad("'stream_options' is only allowed with stream: true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("'stream_options' must be an object with 'include_usage' only", param="stream_options")
    return bool(_typed(options, "include_usage", bool, "true or false"))


def _max_tokens(body: dict, keys: tuple[str, ...], default: int) -> int:
    given = {key: body[key] for key in keys if body.get(key) is not None}
    if len(set(map(json.dumps, given.values()))) > 1:
        raise _bad(f"'{keys[0]}' and '{keys[1]}' differ; give one of them", param=keys[1])
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
            raise _bad(f"'{key}' must be an integer between 1 and {MAX_NEW_TOKENS}, got {json.dumps(value)}",
                       param=key)
        return value
    return default


def _prompt(prompt) -> str | list[int]:
    """A string, or token ids; a list holding one of them is one prompt too."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise _bad("'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")


def _chat_prompt(agent, messages) -> str:
    template = agent.manifest.language_model.chat_template
    if template is None:
        raise _bad(f"'{agent.name}' has no chat template (its tokenizer shipped none); use /v1/completions with a "
                   "prompt in the model's own format", param="messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content} objects", param="messages")
    conversation = [_message(index, message) for index, message in enumerate(messages)]
    codec = agent.codec
    language_model = agent.manifest.language_model
    try:
        return _compiled(template).render(
            messages=conversation, add_generation_prompt=True,
            bos_token=codec.token_text(language_model.bos_token_id) or "",
            eos_token=codec.token_text(language_model.eos_token_id) or "")
    except Exception as error:  # jinja2's errors and the template's own raise_exception: the request's fault
        raise _bad(f"the chat template refused the messages: {error}", param="messages") from None


def _message(index: int, message) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _bad(f"{where} must be an object with a string 'role'", param="messages")
    extra = sorted(set(message) - {"role", "content", "name"})
    if extra:
        raise _bad(f"{where}: '{extra[0]}' is not supported; messages take role, content and name",
                   param="messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise _bad(f"{where}: only text content parts are supported", param="messages")
        content = "".join(part["text"] for part in content)
    if content is not None and not isinstance(content, str):
        raise _bad(f"{where}: 'content' must be a string or a list of text parts", param="messages")
    result = {"role": message["role"], "content": content or ""}
    if isinstance(message.get("name"), str):
        result["name"] = message["name"]
    return result


@lru_cache(maxsize=4)
def _compiled(template: str):
    """The chat template compiled as transformers does: sandboxed, trim_blocks and lstrip_blocks, a tojson filter
    that keeps non-ASCII text, raise_exception."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    def tojson(value, indent=None, ensure_ascii=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(template)


# ---------------------------------------------------------------------------------------------- replies


def _model_card(agent) -> dict:
    created = datetime.fromisoformat(agent.manifest.created.replace("Z", "+00:00"))
    return {"id": agent.name, "object": "model", "created": int(created.timestamp()), "owned_by": "edgeshift"}


def _check_model(agent, name: str) -> None:
    if name != agent.name:
        raise HttpError(HTTPStatus.NOT_FOUND, f"model '{name}' not found; this agent serves '{agent.name}'")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _bad(message: str, param: str | None = None) -> HttpError:
    error = HttpError(HTTPStatus.BAD_REQUEST, message)
    error.param = param
    return error


def _error(error: HttpError) -> dict:
    kinds = {HTTPStatus.NOT_FOUND: "not_found_error", HTTPStatus.SERVICE_UNAVAILABLE: "server_error"}
    return {"error": {"message": str(error), "type": kinds.get(error.status, "invalid_request_error"),
                      "param": getattr(error, "param", None), "code": None}}
