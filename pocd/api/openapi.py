"""The OpenAPI 3.1 schema of the control API, made from its route table and the request and
answer models (pydantic's JSON Schema), never written by hand. Served at /api/openapi.json.

Every operation lists the error answers the API gives (pocd.api.http), all of one shape;
an operation a login opens is marked with the two ways to present a session (the CLI's bearer
token, a browser's cookie with its CSRF header). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from pocd.api.answers import ErrorAnswer

if TYPE_CHECKING:
    from pocd.api.http import Route

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"
_ERRORS = {
    400: "Malformed request (the fields named)",
    401: "No session, an ended one, or a wrong login",
    403: "Not allowed: role, Origin, CSRF token or signature password",
    404: "No such run",
    409: "Refused by run control",
    413: "Body too large",
    415: "Not JSON in UTF-8",
    428: "Needs an electronic signature",
    429: "Account locked or too many failed logins",
    503: "Not completed in time (the store)",
}
_OPEN_ERRORS = (400, 403, 404, 413, 415, 503)  # what an operation without a session answers


def openapi_document(routes: Iterable[Route], public: Collection[str]) -> dict[str, Any]:
    routes = list(routes)
    models: list[tuple[type[BaseModel], Any]] = [(ErrorAnswer, "serialization")]
    for route in routes:
        if route.body is not None:
            models.append((route.body, "validation"))
        if route.answer is not None:
            models.append((route.answer, "serialization"))
    refs, schema = models_json_schema(list(dict.fromkeys(models)), ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        is_open = route.action is None or (route.public is not None and route.public in public)
        operation: dict[str, Any] = {
            "operationId": route.handler.__name__ + _suffix(route.path),
            "summary": route.summary,
            "responses": _responses(route, refs, is_open),
        }
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"\{(\w+)\}", route.path)
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
            }
        operation["security"] = [] if is_open else [{"bearer": []}, {"cookie": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "pocd control API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "pocd_session"},
            },
        },
    }


def _suffix(path: str) -> str:
    # Two routes may share a handler (/api/run/phase and /api/runs/{run}/phase).
    return "_of_run" if "{run}" in path else ""


def _responses(route: Route, refs: dict[Any, Any], is_open: bool) -> dict[str, Any]:
    if route.answer is not None:
        content = {"application/json": {"schema": refs[(route.answer, "serialization")]}}
    else:
        content = {route.content_type: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(route.status): {"description": "Done", "content": content}}
    error = {"application/json": {"schema": refs[(ErrorAnswer, "serialization")]}}
    codes = _OPEN_ERRORS if is_open and route.action is not None else tuple(_ERRORS)
    for code in codes:
        responses[str(code)] = {"description": _ERRORS[code], "content": error}
    return responses
