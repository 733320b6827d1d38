"""The server's OpenAPI document, made to tell the truth: every route's request body, and every
error status it can answer with OpenAI's error JSON.

The errors that middleware and exception handlers produce (a refused Host, a wrong method, a
crash, a body that is not JSON, too large or too slow, a missing API key) are added to every
operation here, by one pass over the generated document, so a new route gets them without
listing them; a route lists only the errors its own code raises (`errors(404, 503)`).
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

ERROR = "Error"  # components/schemas/Error: OpenAI's error JSON
REASONS = {
    400: "the request is malformed, breaks a limit, or its Host is not allowed",
    401: "missing or wrong API key",
    404: "no such model",
    405: "the path does not take this method (the Allow header lists those it takes)",
    408: "the request body did not arrive in time",
    413: "the request body is too large",
    415: "the request body is not sent as application/json",
    500: "an unexpected error (the server log has it)",
    503: "the model is loading or failed to load, or the queue is full (Retry-After)",
    504: "the generation ran past the server's request timeout",
}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for error statuses, each with the error schema."""
    schema = {"$ref": f"#/components/schemas/{ERROR}"}
    return {
        status: {
            "description": REASONS[status],
            "content": {"application/json": {"schema": schema}},
        }
        for status in statuses
    }


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring a required JSON body of `model`'s schema, for routes that read
    their body themselves (to bound its size and time)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install(app: FastAPI, api_keys: bool, body_caps: dict[str, dict[str, Any]]) -> None:
    """Serve a document whose operations also declare the errors every route can give: 400
    (a refused Host), 405, 500; a POST's body errors (408, 413, 415, 400). The routes whose
    router declares a 401 (those behind the API key) get the bearer scheme when the server
    has API keys, and lose the 401 when it has none. `body_caps` adds this server's limits to
    the request-body field of each name (`{"n": {"maximum": 16}}`)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        # a copy: the routes' declarations are shared by every app, the caps are this one's
        document = copy.deepcopy(
            get_openapi(title=app.title, version=app.version, routes=app.routes)
        )
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas[ERROR] = ERROR_SCHEMA
        if api_keys:
            document["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
        for operations in document["paths"].values():
            for method, operation in operations.items():
                statuses = [400, 405, 500]
                if method == "post":
                    statuses += [408, 413, 415]
                    body = operation.get("requestBody", {}).get("content", {})
                    for content in body.values():
                        schema = content["schema"]
                        schemas.update(schema.pop("$defs", {}))  # a body model's nested models
                        for name, cap in body_caps.items():
                            if name in schema.get("properties", {}):
                                schema["properties"][name].update(cap)
                if "401" in operation["responses"]:
                    if api_keys:
                        operation["security"] = [{"bearer": []}]
                    else:
                        del operation["responses"]["401"]
                for status, response in errors(*statuses).items():
                    operation["responses"].setdefault(str(status), response)
                operation["responses"].pop("422", None)  # FastAPI's own; bodies are ours: 400
        app.openapi_schema = document
        return document

    app.openapi = openapi
