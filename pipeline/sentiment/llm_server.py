"""A small OpenAI-compatible chat-completions server over a local transformers causal LM.

``POST /v1/chat/completions`` and ``GET /v1/models``, enough of the protocol for the ``llm``
backend (and for trying it without vLLM): a ``response_format`` of type ``json_schema`` whose
schema is the sentiment answer's gets constrained decoding; anything else is generated freely.
Run it with ``python -m pipeline.sentiment.llm_server --model DIR --port 8000``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pipeline.sentiment.llm import (
    ConstrainedDecoder,
    context_length,
    generate_free,
    render_prompt,
)


class ChatModel:
    """One model answering one request at a time (a lock: transformers models are not
    re-entrant), with a decoder per label set asked for."""

    def __init__(self, model: Any, tokenizer: Any, name: str, max_rationale_tokens: int = 48):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_rationale_tokens = max_rationale_tokens
        self.lock = threading.Lock()
        self.decoders: dict[tuple[str, ...], ConstrainedDecoder] = {}
        self.requests = 0

    @classmethod
    def load(cls, directory: str | Path, name: str | None = None, **kwargs: Any) -> ChatModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.encoder import check_safetensors_only

        path = Path(directory)
        check_safetensors_only(path)  # never unpickle weights (they can run code)
        return cls(AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True),
                   AutoTokenizer.from_pretrained(str(path)), name or path.name, **kwargs)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise ValueError("messages: expected a non-empty list of {role, content} objects")
        labels = _schema_labels(body.get("response_format"))
        try:
            max_tokens = int(body.get("max_tokens") or 128)
            temperature = float(body.get("temperature") or 0.0)
            seed = int(body.get("seed") or 0)
        except (TypeError, ValueError) as exc:
            raise ValueError("max_tokens, temperature and seed must be numbers") from exc
        if max_tokens < 1 or temperature < 0:
            raise ValueError("max_tokens must be positive and temperature not negative")
        with self.lock:
            self.requests += 1
            prompt = render_prompt(self.tokenizer, messages)
            decoder = None
            if labels is not None:
                decoder = self.decoders.get(labels)
                if decoder is None:
                    decoder = self.decoders[labels] = ConstrainedDecoder(
                        self.model, self.tokenizer, labels, self.max_rationale_tokens)
            answer = decoder.answer_tokens() if decoder is not None else 1
            context = context_length(self.model, self.tokenizer)
            if context is not None and len(prompt) + answer > context:
                raise ValueError(f"the prompt is {len(prompt)} tokens; with the answer it does "
                                 f"not fit the model's context of {context} tokens")
            if decoder is not None:
                content, _ = decoder.decode(prompt)
            else:
                if context is not None:
                    max_tokens = min(max_tokens, context - len(prompt))
                content = generate_free(self.model, self.tokenizer, prompt,
                                        max_new_tokens=max_tokens, temperature=temperature,
                                        seed=seed)
        completion = len(self.tokenizer(content, add_special_tokens=False)["input_ids"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                      "total_tokens": len(prompt) + completion},
        }


def _schema_labels(response_format: Any) -> tuple[str, ...] | None:
    """The label enum of a sentiment json_schema response format, or None for free text."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    refusal = ValueError("response_format: this server constrains only the sentiment answer "
                         "schema {label (enum), confidence, rationale}")
    json_schema = response_format.get("json_schema") or {}
    schema = json_schema.get("schema") or {} if isinstance(json_schema, dict) else None
    props = schema.get("properties") or {} if isinstance(schema, dict) else None
    if not isinstance(props, dict) or set(props) != {"label", "confidence", "rationale"} \
            or not isinstance(props["label"], dict):
        raise refusal
    enum = props["label"].get("enum")
    if not isinstance(enum, list) or not enum or not all(
            isinstance(x, str) and x.strip() for x in enum):
        raise refusal
    return tuple(enum)


def make_handler(chat: ChatModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": chat.name, "object": "model", "owned_by": "local"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length < 0:  # read(-1) would wait for the client to close the connection
                    self.close_connection = True
                    raise ValueError("Content-Length must not be negative")
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("request body must be a JSON object")
                if body.get("model") not in (None, chat.name):
                    self._send(404, {"error": {"message": f"model {body.get('model')!r} not "
                                               f"served here (serving {chat.name!r})"}})
                    return
                self._send(200, chat.complete(body))
            except (ValueError, json.JSONDecodeError) as exc:
                self._send(400, {"error": {"message": str(exc), "type": "invalid_request"}})
            except Exception as exc:  # noqa: BLE001 - answer, never drop the connection
                self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}",
                                           "type": "server_error"}})

        def log_message(self, format: str, *args: Any) -> None:  # quiet by default
            pass

    return Handler


def serve(chat: ChatModel, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Start serving in a background thread; the caller calls ``shutdown()`` when done.
    ``port`` 0 picks a free port (``server.server_address[1]``)."""
    server = ThreadingHTTPServer((host, port), make_handler(chat))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="llm-server").start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local causal-LM directory")
    parser.add_argument("--name", help="model name clients ask for (default: directory name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = serve(ChatModel.load(args.model, args.name), args.host, args.port)
    print(f"serving {args.model} on http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
