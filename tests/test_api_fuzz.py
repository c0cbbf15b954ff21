"""The control API fuzzed by schemathesis against the OpenAPI schema it publishes
(GET /api/openapi.json), on a real daemon in its own process: no answer is a 5xx, and every
answer has a documented status, content type and shape. Every route of the route table is
fuzzed, logged in as a user of every role that acts on runs and the site, with valid bodies
and with broken ones (wrong types, missing fields, bytes that are not JSON); and once with no
session, where each operation that needs one answers 401 and nothing else.

The number of examples is bounded and generation derandomized, so the run is short and the
same on every machine; a failure prints the request (as curl) that reproduced it.

Each route is its own test driving schemathesis' strategy for the operation with Hypothesis:
schemathesis' pytest plugin (`schemathesis.pytest.from_fixture`, needed for a schema that is
only there once the daemon runs) reads `Function._nodeid`, which pytest 9.2 no longer has.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pocd.api.http import ROUTES
from pocd.api.openapi import openapi_document
from pocd.settings import ApiSection, load_site
from tests.sitekit import PASSWORD, add_user, spawn_daemon, write_site

# The conformance checks, not the data acceptance ones: an identifier the schema allows (any
# string up to 128 characters) with a control character in it is rightly refused with 400.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
FUZZER = "fuzzer"
ROLES = ("operator", "supervisor", "qa", "qp")
# Wrong signature passwords count towards a lockout, random logins towards the address
# limit: both as high as they go, so that the session lasts the whole fuzz.
ACCESS = """
[access]
lockout_after = 100
address_limit = 10000
"""
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure shows its first case
    suppress_health_check=list(HealthCheck),
)
OPERATIONS = [pytest.param(r.method, r.path, id=f"{r.method} {r.path}") for r in ROUTES]


@dataclass(frozen=True, slots=True)
class Fuzzed:
    """The daemon under fuzz: its base URL, its schema as served, a bearer token of FUZZER."""

    base: str
    schema: Any
    token: str
    public: frozenset[str]

    def operation(self, method: str, path: str) -> Any:
        return self.schema[path][method]


def _login(base: str) -> str:
    answer = requests.post(
        f"{base}/api/login",
        json={"login": FUZZER, "password": PASSWORD, "client": "cli"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["token"]
    return token


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    config = write_site(tmp_path_factory.mktemp("fuzz"), extra=ACCESS)
    site = load_site(config)
    add_user(site.store_path, FUZZER, ROLES, "Fuzz Tester")
    base = f"http://{site.config.api.listen}"
    process = spawn_daemon(config)
    try:
        token = _login(base)
        # A run going on, so that phases and stops reach run control, not only "no run".
        started = requests.post(
            f"{base}/api/runs",
            json={"batch_id": "FUZZ-1", "protocol": "CART-TCT"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert started.status_code == 201, started.text
        # The test sends the session's token itself: schemathesis makes up no credentials.
        generation = schemathesis.Config.from_dict(
            {"generation": {"with-security-parameters": False}}
        )
        schema = schemathesis.openapi.from_url(f"{base}/api/openapi.json", config=generation)
        yield Fuzzed(base, schema, token, frozenset(site.config.api.public))
    finally:
        _stop(process, config.parent / "pocd.log")


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.terminate()
    try:
        assert process.wait(30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # The middleware's last resort (a 500) logs this; no request may have reached it.
    assert "API request failed" not in log.read_text(), log.read_text()


# --- the schema itself -------------------------------------------------------------------------


def test_the_schema_is_openapi_3_1_of_every_route(fuzzed: Fuzzed) -> None:
    document = requests.get(f"{fuzzed.base}/api/openapi.json", timeout=30).json()
    assert document["openapi"] == "3.1.0"
    fuzzed.schema.validate()  # against the OpenAPI 3.1 meta-schema (raises if not)
    for name, model in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(model), name  # JSON Schema 2020-12, as 3.1 has it
    # Made from the route table, and nothing else: what is served is what the table says.
    assert document == openapi_document(ROUTES, fuzzed.public)
    served = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert served == {(r.method, r.path) for r in ROUTES}
    operation_ids = [
        op["operationId"] for item in document["paths"].values() for op in item.values()
    ]
    assert len(set(operation_ids)) == len(operation_ids), operation_ids
    for route in ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        is_open = route.action is None or route.public in fuzzed.public
        assert (operation["security"] == []) == is_open, route.path
        assert ("401" in operation["responses"]) == (route.action is None or not is_open)


def test_the_body_schemas_are_the_models(fuzzed: Fuzzed) -> None:
    document = fuzzed.schema.raw_schema
    components = document["components"]["schemas"]
    template = "#/components/schemas/{model}"
    for route in ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        if route.body is None:
            assert "requestBody" not in operation, route.path
        else:
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert body == {"$ref": template.format(model=route.body.__name__)}
            model = route.body.model_json_schema(ref_template=template, mode="validation")
            for name, definition in model.pop("$defs", {}).items():
                assert components[name] == definition, name
            assert components[route.body.__name__] == model, route.body.__name__
        if route.answer is not None:
            done = operation["responses"][str(route.status)]["content"]["application/json"]
            assert done["schema"] == {"$ref": template.format(model=route.answer.__name__)}
    phase = components["PhaseRequest"]
    assert set(phase["properties"]) == {"phase", "reason", "signature"}
    assert phase["required"] == ["phase"]
    assert phase["additionalProperties"] is False  # so "operator" is refused, not ignored
    for name in ("PhaseRequest", "RunStartRequest", "RunStopRequest", "SiteStatusRequest"):
        # Who acts is the session's user, never a field of the body.
        assert "operator" not in components[name]["properties"], name


# --- fuzzing -----------------------------------------------------------------------------------


def _cases(operation: Any) -> st.SearchStrategy[Case]:
    """Valid requests, and, where there is something to break (a body, a path parameter),
    broken ones."""
    strategy: st.SearchStrategy[Case] = operation.as_strategy(GenerationMode.POSITIVE)
    if operation.body or operation.path_parameters:
        strategy = st.one_of(strategy, operation.as_strategy(GenerationMode.NEGATIVE))
    return strategy


def _signed_sometimes(case: Case) -> None:
    """Half of the signatures (by the length of the password generated) with the real
    password, so that signed operations get past the signature check too."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("signature"), dict):
        signature = body["signature"]
        password = signature.get("password")
        if isinstance(password, str) and len(password) % 2 == 0:
            case.body = {**body, "signature": {**signature, "password": PASSWORD}}


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_answer_is_a_server_error_or_off_the_schema(
    fuzzed: Fuzzed, method: str, path: str
) -> None:
    operation = fuzzed.operation(method, path)

    @FUZZ
    @given(_cases(operation))
    def fuzz(case: Case) -> None:
        token = fuzzed.token
        if path == "/api/logout":
            token = _login(fuzzed.base)  # a session of its own to end, not the fuzz's
        _signed_sometimes(case)
        case.call_and_validate(
            base_url=fuzzed.base,
            headers={"Authorization": f"Bearer {token}"},
            checks=CHECKS,
            timeout=30,
        )

    fuzz()


def test_the_session_lasted_the_whole_fuzz(fuzzed: Fuzzed) -> None:
    # After the fuzz (pytest keeps the file's order): a session ended part way (a lockout, a
    # logout of the fuzz's own session) would have turned the rest of it into 401s.
    answer = requests.get(
        f"{fuzzed.base}/api/session",
        headers={"Authorization": f"Bearer {fuzzed.token}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["login"] == FUZZER


PUBLIC = frozenset(ApiSection().public)  # the fuzzed site's: it does not set api.public
SESSION_NEEDED = [
    pytest.param(r.method, r.path, id=f"{r.method} {r.path}")
    for r in ROUTES
    if r.action is not None and r.public not in PUBLIC
]


@pytest.mark.parametrize(("method", "path"), SESSION_NEEDED)
def test_without_a_session_only_401(fuzzed: Fuzzed, method: str, path: str) -> None:
    assert fuzzed.public == PUBLIC
    operation = fuzzed.operation(method, path)
    assert operation.definition.raw["security"], "the schema says it needs no session"

    @settings(FUZZ, max_examples=5)
    @given(operation.as_strategy(GenerationMode.POSITIVE))
    def fuzz(case: Case) -> None:
        response = case.call_and_validate(base_url=fuzzed.base, checks=CHECKS, timeout=30)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == ['Bearer realm="pocd"']

    fuzz()


def test_the_public_reads_need_no_session(fuzzed: Fuzzed) -> None:
    opened = [r for r in ROUTES if r.public in PUBLIC]
    assert {r.path for r in opened} == {"/api/health", "/health", "/api/openapi.json", "/metrics"}
    for route in opened:
        answer = requests.request(route.method, f"{fuzzed.base}{route.path}", timeout=30)
        assert answer.status_code == 200, (route.path, answer.text)


# --- what the fuzz found, pinned ---------------------------------------------------------------


def test_a_signature_on_completing_a_run_is_refused_naming_it(fuzzed: Fuzzed) -> None:
    # Completing is not a signed action: its signature was looked up in SIGNED (a 500).
    signature = {"password": PASSWORD, "meaning": "performed"}
    for path in ("/api/run/stop", "/api/runs/FUZZ-1/stop"):
        answer = requests.post(
            f"{fuzzed.base}{path}",
            json={"signature": signature},
            headers={"Authorization": f"Bearer {fuzzed.token}"},
            timeout=30,
        )
        assert answer.status_code == 400, answer.text
        assert answer.json() == {
            "error": "signature: run.stop is not signed; send none",
            "fields": ["signature"],
        }


def test_a_logout_as_the_schema_has_it_needs_no_body(fuzzed: Fuzzed) -> None:
    # No request body, so no Content-Type: it was refused with 415.
    token = _login(fuzzed.base)
    bearer = {"Authorization": f"Bearer {token}"}
    answer = requests.post(f"{fuzzed.base}/api/logout", headers=bearer, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"logged_out": FUZZER}
    answer = requests.get(f"{fuzzed.base}/api/session", headers=bearer, timeout=30)
    assert answer.status_code == 401, answer.text
