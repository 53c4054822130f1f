"""The server's OpenAPI 3 document (``GET /openapi.json``), written by hand.

The handlers validate bodies themselves (``protocol.py``) so errors carry OpenAI's shape;
this document describes the same contract for clients, generators and the schema fuzz in
``tests/test_server_fuzz.py``. Ranges here are the ones ``protocol.py`` enforces.
"""

from __future__ import annotations

from typing import Any

from odma_mlu.engine.sampler import MAX_LOGPROBS, MAX_TOP_K, SEED_MAX, SEED_MIN
from odma_mlu.server.protocol import MAX_N, MAX_STOP_STRINGS

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": "string", "nullable": True}, "code": {"type": "string", "nullable": True}}}}}


def _sampling_props() -> dict[str, Any]:
    return {
        "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "nullable": True},
        "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1, "nullable": True},
        "top_k": {"type": "integer", "minimum": -1, "maximum": MAX_TOP_K, "nullable": True},
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "nullable": True},
        "seed": {"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX, "nullable": True},
        "stop": {"nullable": True, "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": {"type": "string", "minLength": 1}}]},
        "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "nullable": True},
        "min_tokens": {"type": "integer", "minimum": 0, "nullable": True},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 10,
                               "nullable": True},
        "stream": {"type": "boolean", "nullable": True},
        "stream_options": {"type": "object", "nullable": True,
                           "properties": {"include_usage": {"type": "boolean"}}, "additionalProperties": False},
        "ignore_eos": {"type": "boolean", "nullable": True},
        "return_token_ids": {"type": "boolean", "nullable": True},
        "skip_special_tokens": {"type": "boolean", "nullable": True},
        "response_format": {"type": "object", "nullable": True, "required": ["type"],
                            "properties": {"type": {"type": "string", "enum": ["text"]}}},
        "user": {"type": "string", "nullable": True},
    }


def _message() -> dict[str, Any]:
    return {"type": "object", "required": ["role", "content"], "additionalProperties": False, "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool", "developer"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]},
        "reasoning_content": {"type": "string"}}}


def openapi_document(model_name: str) -> dict[str, Any]:
    model = {"type": "string", "enum": [model_name]}
    completion = {"type": "object", "required": ["model", "prompt"], "additionalProperties": False,
                  "properties": {"model": model,
                                 "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                                                      {"type": "array", "minItems": 1,
                                                       "items": {"type": "integer", "minimum": 0}}]},
                                 "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                                              "nullable": True},
                                 "parse_special_tokens": {"type": "boolean"},
                                 **_sampling_props()}}
    chat = {"type": "object", "required": ["model", "messages"], "additionalProperties": False,
            "properties": {"model": model,
                           "messages": {"type": "array", "minItems": 1, "items": _message()},
                           "logprobs": {"type": "boolean", "nullable": True},
                           "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                                            "nullable": True},
                           **_sampling_props()}}
    tokenize = {"type": "object", "additionalProperties": False, "properties": {
        "model": model, "prompt": {"type": "string"}, "messages": {"type": "array", "minItems": 1, "items": _message()},
        "add_special_tokens": {"type": "boolean"}, "add_generation_prompt": {"type": "boolean"},
        "return_token_strs": {"type": "boolean"}}}
    detokenize = {"type": "object", "required": ["tokens"], "additionalProperties": False, "properties": {
        "model": model, "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}}}
    errors = {str(code): {"description": text, "content": {"application/json": {"schema": _ERROR}}}
              for code, text in ((400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                                 (408, "body not received in time"), (413, "body too large"),
                                 (429, "queue full; see Retry-After"), (503, "draining or engine stopped"))}

    def post(schema: dict[str, Any], summary: str, stream: bool = False) -> dict[str, Any]:
        content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
        if stream:
            content["text/event-stream"] = {"schema": {"type": "string"}}
        return {"post": {"summary": summary,
                         "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                         "responses": {"200": {"description": "OK", "content": content}, **errors}}}

    def get(summary: str, codes: tuple[int, ...] = ()) -> dict[str, Any]:
        return {"get": {"summary": summary, "responses": {
            "200": {"description": "OK"}, **{str(c): errors[str(c)] for c in codes if str(c) in errors}}}}

    return {
        "openapi": "3.0.3",
        "info": {"title": "odma-mlu", "version": "1", "description": "OpenAI-compatible LLM serving with ODMA KV"},
        "paths": {
            "/v1/completions": post(completion, "Text completion", stream=True),
            "/v1/chat/completions": post(chat, "Chat completion", stream=True),
            "/tokenize": post(tokenize, "Prompt or messages to token ids"),
            "/detokenize": post(detokenize, "Token ids to text"),
            "/v1/models": get("The served model", (401,)),
            "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "serving"},
                                                                     "503": {"description": "draining or dead"}}}},
            "/metrics": get("Prometheus metrics"),
        },
    }
