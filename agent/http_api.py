"""KServe v2 / Open Inference Protocol over HTTP (JSON tensors), plus Prometheus /metrics.

GET /v2/health/live, /v2/health/ready, /v2, /v2/models/<name>, /v2/models/<name>/ready;
POST /v2/models/<name>/infer, and for a causal-lm portfolio POST /v2/models/<name>/generate
(the generate extension: greedy decoding, answered by one variant). The response's
parameters.variant names the variant that answered.
"""
from __future__ import annotations

import json
import logging
import math
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from agent import __version__
from agent.generate import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS
from agent.metrics import render_metrics
from agent.runtime import InferenceError

log = logging.getLogger("edgeshift.http")

# Open Inference Protocol datatypes and their numpy twins.
DATATYPES = {"FP32": "float32", "FP64": "float64", "FP16": "float16", "INT64": "int64", "INT32": "int32",
             "INT16": "int16", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
_TO_DATATYPE = {np.dtype(v): k for k, v in DATATYPES.items()}
GENERATE_PARAMETERS = ("max_tokens",)


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class InferenceServer:
    """Serves an Agent on host:port in background threads; `port` is the bound one (0 picks a free port)."""

    def __init__(self, agent, host: str = "127.0.0.1", port: int = 8080, max_body_bytes: int = 16 << 20):
        handler = type("Handler", (_Handler,), {"agent": agent, "max_body_bytes": max_body_bytes})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="edgeshift-http", daemon=True)

    def start(self) -> "InferenceServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    agent = None
    max_body_bytes = 16 << 20
    protocol_version = "HTTP/1.1"
    server_version = f"edgeshift/{__version__}"

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    # ------------------------------------------------------------------ routes

    def _get(self) -> tuple[HTTPStatus, dict | str]:
        parts = self._parts()
        agent = self.agent
        if parts == ["v2", "health", "live"]:
            return HTTPStatus.OK, {"live": True}
        if parts == ["v2", "health", "ready"]:
            return (HTTPStatus.OK if agent.ready else HTTPStatus.SERVICE_UNAVAILABLE), {"ready": agent.ready}
        if parts == ["v2"]:
            extensions = ["generate"] if agent.manifest.task == "causal-lm" else []
            return HTTPStatus.OK, {"name": "edgeshift", "version": __version__, "extensions": extensions}
        if parts == ["metrics"]:
            return HTTPStatus.OK, render_metrics(agent)
        if len(parts) in (3, 4) and parts[:2] == ["v2", "models"] and parts[3:] in ([], ["ready"]):
            self._model(parts[2])
            if parts[3:] == ["ready"]:
                return (HTTPStatus.OK if agent.ready else HTTPStatus.SERVICE_UNAVAILABLE), {"name": agent.name,
                                                                                           "ready": agent.ready}
            return HTTPStatus.OK, self._metadata()
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path}")

    def _post(self) -> tuple[HTTPStatus, dict]:
        parts = self._parts()
        if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] in ("infer", "generate"):
            self._model(parts[2])
            body = self._json_body()
            return HTTPStatus.OK, (self._infer(body) if parts[3] == "infer" else self._generate(body))
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}")

    def _infer(self, request: dict) -> dict:
        agent = self.agent
        self._ready()
        tensors = request.get("inputs")
        if not isinstance(tensors, list) or not tensors:
            raise HttpError(HTTPStatus.BAD_REQUEST, "'inputs' must be a non-empty list of tensors")
        by_name = {spec.name: spec for spec in agent.manifest.inputs}
        arrays = {}
        for tensor in tensors:
            name, array = _decode_tensor(tensor, by_name)
            arrays[name] = array
        missing = [name for name in by_name if name not in arrays]
        if missing:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"missing input '{missing[0]}'")
        try:
            result = agent.infer([arrays[spec.name] for spec in agent.manifest.inputs])
        except InferenceError as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(error)) from None
        outputs = [_encode_tensor(spec.name, array) for spec, array in zip(agent.manifest.outputs, result.outputs)]
        response = {"model_name": agent.name, "model_version": result.variant, "outputs": outputs,
                    "parameters": {"variant": result.variant, "latency_ms": round(result.latency_ms, 3)}}
        if "id" in request:
            response["id"] = request["id"]
        return response

    def _generate(self, request: dict) -> dict:
        agent = self.agent
        self._ready()
        if agent.manifest.task != "causal-lm":
            raise HttpError(HTTPStatus.BAD_REQUEST, f"'{agent.name}' is a {agent.manifest.task} model; "
                                                    "generate needs a causal-lm portfolio: use /infer")
        prompt = _prompt(request)
        max_tokens = _max_tokens(request.get("parameters", {}))
        try:
            result = agent.generate(prompt, max_new_tokens=max_tokens)
        except InferenceError as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(error)) from None
        response = {"model_name": agent.name, "model_version": result.variant, "output_ids": result.new_ids,
                    "parameters": {"variant": result.variant, "stop_reason": result.stop_reason,
                                   "tokens": len(result.new_ids), "tokens_per_s": round(result.tokens_per_s, 3)}}
        if result.text is not None:
            response["text_output"] = result.text
        if "id" in request:
            response["id"] = request["id"]
        return response

    def _metadata(self) -> dict:
        agent = self.agent
        status = agent.status()
        spec = lambda s: {"name": s.name, "datatype": _TO_DATATYPE.get(np.dtype(s.dtype), s.dtype.upper()),
                          "shape": s.shape}
        return {"name": agent.name, "versions": status["variants"], "platform": agent.backend.name,
                "inputs": [spec(s) for s in agent.manifest.inputs], "outputs": [spec(s) for s in agent.manifest.outputs],
                "parameters": {"active": status["active"], "reason": status["reason"], "task": agent.manifest.task,
                               "providers": status["providers"]}}

    # ------------------------------------------------------------------ plumbing

    def _ready(self) -> None:
        if not self.agent.ready:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "the agent is starting; retry when /v2/health/ready is 200")

    def _model(self, name: str) -> None:
        if name != self.agent.name:
            raise HttpError(HTTPStatus.NOT_FOUND, f"unknown model '{name}'; this agent serves '{self.agent.name}'")

    def _parts(self) -> list[str]:
        return [p for p in self.path.split("?", 1)[0].split("/") if p]

    def _json_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if int(length) > self.max_body_bytes:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"request body of {int(length)} bytes exceeds the limit of {self.max_body_bytes}")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (ValueError, UnicodeDecodeError) as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        return body

    def _answer(self, route) -> None:
        try:
            status, payload = route()
        except HttpError as error:
            status, payload = error.status, {"error": str(error)}
        except Exception as error:  # a bug must answer 500, never kill the server
            log.exception("request failed: %s %s", self.command, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"}
        if isinstance(payload, str):
            body, kind = payload.encode(), "text/plain; version=0.0.4; charset=utf-8"
        else:
            body, kind = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def _decode_tensor(tensor: dict, specs: dict) -> tuple[str, np.ndarray]:
    if not isinstance(tensor, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, "each input must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    if name not in specs:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown input '{name}'; the model takes: {', '.join(specs)}")
    shape, datatype, data = tensor.get("shape"), tensor.get("datatype"), tensor.get("data")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': shape must be a list of non-negative integers")
    expected_dtype = np.dtype(specs[name].dtype)
    if DATATYPES.get(datatype) != expected_dtype.name:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': datatype must be "
                                                f"{_TO_DATATYPE.get(expected_dtype, expected_dtype.name)}, got {datatype!r}")
    if expected_dtype.kind in "iu" and not _all_integers(data):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': data must be integers for {datatype}")
    try:
        array = np.asarray(data, dtype=expected_dtype)
    except (TypeError, ValueError, OverflowError):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': data must be numbers") from None
    if array.size != math.prod(shape):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': {array.size} values do not fill shape {shape}")
    return name, array.reshape(shape)


def _all_integers(data) -> bool:
    """JSON integers only, at any nesting: numpy would truncate 1.5 to 1 without a word."""
    if isinstance(data, list):
        return all(_all_integers(item) for item in data)
    return isinstance(data, int) and not isinstance(data, bool)


def _prompt(request: dict) -> str | list[int]:
    has_text, has_ids = "text_input" in request, "input_ids" in request
    if has_text == has_ids:
        raise HttpError(HTTPStatus.BAD_REQUEST, "give the prompt as 'text_input' (a string) or 'input_ids' "
                                                "(a list of token ids), exactly one of them")
    if has_text:
        if not isinstance(request["text_input"], str):
            raise HttpError(HTTPStatus.BAD_REQUEST, "'text_input' must be a string")
        return request["text_input"]
    ids = request["input_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise HttpError(HTTPStatus.BAD_REQUEST, "'input_ids' must be a flat list of integer token ids")
    return ids


def _max_tokens(parameters) -> int:
    if not isinstance(parameters, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, "'parameters' must be an object")
    unknown = sorted(set(parameters) - set(GENERATE_PARAMETERS))
    if unknown:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown parameter '{unknown[0]}'; decoding is greedy and "
                                                f"takes: {', '.join(GENERATE_PARAMETERS)}")
    max_tokens = parameters.get("max_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise HttpError(HTTPStatus.BAD_REQUEST,
                        f"'max_tokens' must be an integer between 1 and {MAX_NEW_TOKENS}, got {max_tokens!r}")
    return max_tokens


def _encode_tensor(name: str, array: np.ndarray) -> dict:
    return {"name": name, "shape": list(array.shape),
            "datatype": _TO_DATATYPE.get(array.dtype, array.dtype.name.upper()), "data": array.ravel().tolist()}
