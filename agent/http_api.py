"""KServe v2 / Open Inference Protocol over HTTP, plus Prometheus /metrics.

GET /v2/health/live, /v2/health/ready, /v2, /v2/models/<name>, /v2/models/<name>/ready;
POST /v2/models/<name>/infer with JSON tensors or the binary tensor data extension (an
Inference-Header-Content-Length JSON header, then each binary input's raw little-endian bytes in
input order; outputs in binary when parameters.binary_data_output or an output's
parameters.binary_data asks), and for a causal-lm portfolio POST /v2/models/<name>/generate
(the generate extension: greedy or sampled decoding, answered by one variant; agent/openai_api.py serves
the OpenAI-compatible /v1 routes). The response's
parameters.variant names the variant that answered. Bad input is a 4xx naming the reason, never a 500.
"""
from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

try:  # a dependency, optional at run time: parses a tensor's floats ~6x faster than json.loads (README, HTTP)
    from orjson import loads as _json_loads
except ImportError:
    _json_loads = json.loads

from agent import __version__
from agent.generate import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS
from agent.metrics import render_metrics
from agent.runtime import InferenceError
from agent.sampling import sampler_from, stop_strings

log = logging.getLogger("edgeshift.http")

# Open Inference Protocol datatypes and their numpy twins.
DATATYPES = {"FP32": "float32", "FP64": "float64", "FP16": "float16", "INT64": "int64", "INT32": "int32",
             "INT16": "int16", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
_TO_DATATYPE = {np.dtype(v): k for k, v in DATATYPES.items()}
GENERATE_PARAMETERS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop")
INFER_HEADER = "Inference-Header-Content-Length"  # the binary tensor data extension's header
MAX_JSON_DEPTH = 64  # deeper JSON is refused before parsing: json.loads would recurse on it
MAX_RANK = 32  # numpy's smallest limit on dimensions
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


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
    protocol_version = "HTTP/1.1"  # keep-alive: a client does not reconnect for each request
    wbufsize = -1  # buffered: headers and a small body leave in one send (handle_one_request flushes)
    disable_nagle_algorithm = True  # a large body leaves right after its headers, without a delayed-ACK stall
    server_version = f"edgeshift/{__version__}"

    def do_GET(self) -> None:
        self._body_read = True  # a GET's body is not read, nor expected
        self._answer(self._get)

    def do_POST(self) -> None:
        self._arrived = time.monotonic()  # the request line is read: queueing from here counts toward the SLO
        self._body_read = False
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
            extensions = ["binary_tensor_data"] + (["generate"] if agent.manifest.task == "causal-lm" else [])
            return HTTPStatus.OK, {"name": "edgeshift", "version": __version__, "extensions": extensions}
        if parts == ["metrics"]:
            return HTTPStatus.OK, render_metrics(agent)
        if len(parts) in (3, 4) and parts[:2] == ["v2", "models"] and parts[3:] in ([], ["ready"]):
            self._model(parts[2])
            if parts[3:] == ["ready"]:
                return (HTTPStatus.OK if agent.ready else HTTPStatus.SERVICE_UNAVAILABLE), {"name": agent.name,
                                                                                           "ready": agent.ready}
            return HTTPStatus.OK, self._metadata()
        if parts[:1] == ["v1"]:  # OpenAI-compatible routes (imported here: openai_api imports this module)
            from agent.openai_api import get
            return get(self, parts)
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path}")

    def _post(self) -> tuple[HTTPStatus, dict | BinaryReply]:
        parts = self._parts()
        if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] in ("infer", "generate"):
            self._model(parts[2])
            body, binary = self._body()
            if parts[3] == "infer":
                return HTTPStatus.OK, self._infer(body, binary)
            if binary:
                raise HttpError(HTTPStatus.BAD_REQUEST, "generate takes a JSON body only, no binary tensor data")
            return HTTPStatus.OK, self._generate(body)
        if parts[:1] == ["v1"]:
            from agent.openai_api import post
            return post(self, parts)
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}")

    def _infer(self, request: dict, binary: memoryview) -> dict | BinaryReply:
        agent = self.agent
        self._ready()
        tensors = request.get("inputs")
        if not isinstance(tensors, list) or not tensors:
            raise HttpError(HTTPStatus.BAD_REQUEST, "'inputs' must be a non-empty list of tensors")
        parameters = _parameters(request, "the request")
        binary_default = _flag(parameters, "binary_data_output", "the request")
        wanted = _wanted_outputs(request.get("outputs"), agent.manifest.outputs, binary_default)
        by_name = {spec.name: spec for spec in agent.manifest.inputs}
        arrays = {}
        offset = 0
        for tensor in tensors:
            name, array, offset = _decode_tensor(tensor, by_name, binary, offset)
            if name in arrays:
                raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}' is given twice")
            arrays[name] = array
        if offset != len(binary):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{len(binary) - offset} bytes of binary data after the JSON "
                                                    "header belong to no input's binary_data_size")
        missing = [name for name in by_name if name not in arrays]
        if missing:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"missing input '{missing[0]}'")
        try:
            result = agent.infer([arrays[spec.name] for spec in agent.manifest.inputs], self._arrived)
        except InferenceError as error:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(error)) from None
        produced = {spec.name: array for spec, array in zip(agent.manifest.outputs, result.outputs)}
        outputs, chunks = [], []
        for name, as_binary in wanted:
            array = produced[name]
            if as_binary:
                chunk = _to_little_endian(array).tobytes()
                chunks.append(chunk)
                outputs.append({"name": name, "shape": list(array.shape), "datatype": _datatype(array.dtype),
                                "parameters": {"binary_data_size": len(chunk)}})
            else:
                outputs.append(_encode_tensor(name, array))
        response = {"model_name": agent.name, "model_version": result.variant, "outputs": outputs,
                    "parameters": {"variant": result.variant, "latency_ms": round(result.latency_ms, 3)}}
        if "id" in request:
            response["id"] = request["id"]
        return BinaryReply(response, chunks) if chunks else response

    def _generate(self, request: dict) -> dict:
        agent = self.agent
        self._ready()
        if agent.manifest.task != "causal-lm":
            raise HttpError(HTTPStatus.BAD_REQUEST, f"'{agent.name}' is a {agent.manifest.task} model; "
                                                    "generate needs a causal-lm portfolio: use /infer")
        prompt = _prompt(request)
        parameters = request.get("parameters", {})
        max_tokens = _max_tokens(parameters)
        try:  # greedy unless a temperature is given
            result = agent.generate(prompt, max_new_tokens=max_tokens, sampler=sampler_from(parameters, 0.0),
                                    stop=stop_strings(parameters.get("stop")))
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

    def _body(self) -> tuple[dict, memoryview]:
        """The JSON object, and the binary tensor data after it (empty without Inference-Header-Content-Length)."""
        length = _header_int(self.headers.get("Content-Length"))
        if length is None:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if length > self.max_body_bytes:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"request body of {length} bytes exceeds the limit of {self.max_body_bytes}")
        raw = self.rfile.read(length)
        if len(raw) != length:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(raw)} of {length} bytes")
        self._body_read = True
        header = self.headers.get(INFER_HEADER)
        if header is None:
            return _parse_json(raw), memoryview(b"")
        header_length = _header_int(header)
        if header_length is None or header_length > length:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{INFER_HEADER} must be an integer between 0 and the "
                                                    f"body's {length} bytes, got {header!r}")
        return _parse_json(raw[:header_length]), memoryview(raw)[header_length:]

    def _discard_body(self) -> None:
        """Read a body the route refused before reading (404, 503), so that the connection can stay open; close it
        when the body has no length or is too large to read: it must not be parsed as the next request."""
        length = _header_int(self.headers.get("Content-Length"))
        if length is not None and length <= self.max_body_bytes and "Transfer-Encoding" not in self.headers:
            self._body_read = len(self.rfile.read(length)) == length
        if not self._body_read:
            self.close_connection = True

    def _answer(self, route) -> None:
        try:
            status, payload = route()
        except HttpError as error:
            status, payload = error.status, {"error": str(error)}
        except Exception as error:  # a bug must answer 500, never kill the server
            log.exception("request failed: %s %s", self.command, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"}
        if payload is None:  # the route streamed its answer itself (openai_api's server-sent events)
            return
        if not self._body_read:
            self._discard_body()
        header_length = None
        if isinstance(payload, str):
            body, kind = payload.encode(), "text/plain; version=0.0.4; charset=utf-8"
        elif isinstance(payload, BinaryReply):
            header = json.dumps(payload.header).encode()
            body, kind, header_length = b"".join([header, *payload.chunks]), "application/octet-stream", len(header)
        else:
            body, kind = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if header_length is not None:
            self.send_header(INFER_HEADER, str(header_length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


class BinaryReply:
    """An infer response with binary outputs: the JSON header, then each binary output's bytes in order."""

    def __init__(self, header: dict, chunks: list[bytes]):
        self.header, self.chunks = header, chunks


def _header_int(value: str | None) -> int | None:
    """A header's non-negative decimal integer, or None (str.isdigit alone takes '²', which int() refuses)."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() else None


def _parse_json(data: bytes) -> dict:
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH and _nesting_depth(data) > MAX_JSON_DEPTH:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = _json_loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:  # orjson's JSONDecodeError is a ValueError
        raise HttpError(HTTPStatus.BAD_REQUEST, f"request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
    return body


def _nesting_depth(data: bytes) -> int:
    """The deepest nesting of JSON arrays and objects, counted without parsing (brackets in strings skipped)."""
    brackets = np.frombuffer(_STRINGS.sub(b"", data).translate(None, _NOT_BRACKETS), np.uint8)
    if not brackets.size:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _parameters(holder: dict, what: str) -> dict:
    parameters = holder.get("parameters", {})
    if not isinstance(parameters, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{what}: 'parameters' must be an object")
    return parameters


def _flag(parameters: dict, key: str, what: str, default: bool = False) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{what}: parameter '{key}' must be true or false, got {value!r}")
    return value


def _wanted_outputs(requested, specs, binary_default: bool) -> list[tuple[str, bool]]:
    """(name, as binary) per output to answer: all of them without 'outputs', else those named, in that order."""
    names = [spec.name for spec in specs]
    if requested is None:
        return [(name, binary_default) for name in names]
    if not isinstance(requested, list):
        raise HttpError(HTTPStatus.BAD_REQUEST, "'outputs' must be a list of objects with a name")
    wanted = []
    for output in requested:
        name = output.get("name") if isinstance(output, dict) else None
        if not isinstance(name, str):
            raise HttpError(HTTPStatus.BAD_REQUEST, "each of 'outputs' must be an object with a string 'name'")
        if name not in names:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown output '{name}'; the model gives: {', '.join(names)}")
        if any(name == seen for seen, _ in wanted):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"output '{name}' is asked for twice")
        what = f"output '{name}'"
        wanted.append((name, _flag(_parameters(output, what), "binary_data", what, binary_default)))
    return wanted


def _decode_tensor(tensor, specs: dict, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    """The input's name and array, and the offset in `binary` after its bytes (unchanged for JSON data)."""
    if not isinstance(tensor, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, "each input must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"an input's 'name' must be a string, got {_kind(name)}")
    if name not in specs:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown input '{name}'; the model takes: {', '.join(specs)}")
    shape, datatype = tensor.get("shape"), tensor.get("datatype")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 62 for d in shape)):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': shape must be a list of at most {MAX_RANK} "
                                                "non-negative integers")
    expected_dtype = np.dtype(specs[name].dtype)
    if not isinstance(datatype, str) or DATATYPES.get(datatype) != expected_dtype.name:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': datatype must be "
                                                f"{_datatype(expected_dtype)}, got {datatype!r}")
    count = math.prod(shape)
    size = _parameters(tensor, f"input '{name}'").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': binary_data_size must be a non-negative "
                                                    f"integer, got {size!r}")
        if "data" in tensor:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': give 'data' or binary_data_size, not both")
        if size != count * expected_dtype.itemsize:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': binary_data_size {size} is not the "
                                                    f"{count * expected_dtype.itemsize} bytes of {datatype} {shape}")
        if offset + size > len(binary):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': binary_data_size {size} runs past the "
                                                    f"{len(binary) - offset} bytes of binary data left")
        array = np.frombuffer(binary[offset:offset + size], dtype=expected_dtype.newbyteorder("<"))
        return name, _reshape(name, array.astype(expected_dtype, copy=False), shape), offset + size
    data = tensor.get("data")
    if not isinstance(data, list):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': 'data' must be a list of values "
                                                "(or use the binary tensor data extension)")
    if _list_depth(data) > MAX_RANK:  # numpy would refuse it with a message of its own, varying by version
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': data is nested more than {MAX_RANK} lists deep; "
                                                f"give it the tensor's shape (or flat)")
    if expected_dtype.kind in "iu" and not _all_integers(data):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': data must be integers for {datatype}")
    try:
        array = np.asarray(data, dtype=expected_dtype)
    except (TypeError, ValueError, OverflowError):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': data must be numbers") from None
    if array.size != count:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': {array.size} values do not fill shape {shape}")
    return name, _reshape(name, array, shape), offset


def _list_depth(data) -> int:
    """How many lists deep the first element sits: a tensor's nested data has its rank there."""
    depth = 0
    while isinstance(data, list):
        depth += 1
        data = data[0] if data else None
    return depth


def _reshape(name: str, array: np.ndarray, shape: list[int]) -> np.ndarray:
    try:
        return array.reshape(shape)
    except ValueError as error:  # an empty tensor with dimensions numpy cannot address
        raise HttpError(HTTPStatus.BAD_REQUEST, f"input '{name}': shape {shape}: {error}") from None


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _datatype(dtype: np.dtype) -> str:
    return _TO_DATATYPE.get(dtype, dtype.name.upper())


def _to_little_endian(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


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
        raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown parameter '{unknown[0]}'; generate "
                                                f"takes: {', '.join(GENERATE_PARAMETERS)}")
    max_tokens = parameters.get("max_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise HttpError(HTTPStatus.BAD_REQUEST,
                        f"'max_tokens' must be an integer between 1 and {MAX_NEW_TOKENS}, got {max_tokens!r}")
    return max_tokens


def _encode_tensor(name: str, array: np.ndarray) -> dict:
    return {"name": name, "shape": list(array.shape), "datatype": _datatype(array.dtype),
            "data": array.ravel().tolist()}
