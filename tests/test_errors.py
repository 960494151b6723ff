"""The error tree: one root for every exception class of ``gateway/``, and the stable problem codes
(CONTRACT.md) with their HTTP statuses, which clients rely on."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import gateway
from gateway import errors
from gateway.errors import ApiError, GatewayError, ProblemCode

# Pinned: renaming a code or changing its status breaks clients (CONTRACT.md, README "REST API").
STABLE = {
    "bad_request": 400,
    "packet_invalid": 400,
    "query_invalid": 400,
    "config_invalid": 400,
    "auth_missing": 401,
    "auth_invalid": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "not_acceptable": 406,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "too_many_streams": 429,
    "internal": 500,
    "db_unavailable": 503,
    "query_timeout": 503,
    "mqtt_unavailable": 503,
    "shutting_down": 503,
    "streams_exhausted": 503,
}
OUTSIDE_THE_TREE = {"gateway.mqtt_codec.MqttCodecError"}  # a pure codec's ValueError (see errors.py)


def test_problem_codes_and_statuses_are_the_stable_ones() -> None:
    assert {c.value: c.status for c in ProblemCode} == STABLE
    assert all(c.summary and c.summary[0].isupper() for c in ProblemCode)
    assert ProblemCode("query_invalid") is ProblemCode.QUERY_INVALID and ProblemCode.QUERY_INVALID == "query_invalid"


def test_contract_lists_only_codes_that_exist() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("Error codes:", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`([a-z_]+)` \(|`([a-z_]+)` /", section))
    codes = {a or b for a, b in named}
    assert codes and codes <= set(STABLE), codes - set(STABLE)


def test_every_exception_class_of_the_gateway_is_in_the_tree() -> None:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if info.name == "gateway.__main__":  # runs the command line when imported
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    outside = {name for name, cls in found.items() if not issubclass(cls, GatewayError)}
    assert outside == OUTSIDE_THE_TREE
    # ... and each is defined in errors.py and drawn in its docstring.
    assert {cls.__module__ for cls in found.values() if issubclass(cls, GatewayError)} == {"gateway.errors"}
    doc = errors.__doc__ or ""
    for name, cls in found.items():
        assert re.search(rf"\b{cls.__name__}\b", doc), name


def test_an_api_error_answers_with_its_codes_status() -> None:
    exc = ApiError(ProblemCode.TOO_MANY_STREAMS, "enough", headers={"Retry-After": "5"}, limit=2)
    assert (exc.status, exc.code, str(exc), exc.extra) == (429, "too_many_streams", "enough", {"limit": 2})
    assert isinstance(exc, GatewayError)


def test_domain_errors_carry_the_code_the_api_answers_with() -> None:
    assert errors.StoreUnavailable("down").code is ProblemCode.DB_UNAVAILABLE
    assert errors.StoreAccessRefused("no role").code is ProblemCode.DB_UNAVAILABLE
    assert errors.QueryTimeout("slow").code is ProblemCode.QUERY_TIMEOUT
    assert errors.StoreCorrupt("bad").code is ProblemCode.INTERNAL
    assert errors.StoreRefused("nul").code is ProblemCode.INTERNAL
    assert errors.MqttUnavailable("full").code is ProblemCode.MQTT_UNAVAILABLE
    assert errors.ConfigError("MQTT_URL", "bad").code is ProblemCode.CONFIG_INVALID
    assert errors.ActionFailed("script", "exit 1").code is ProblemCode.INTERNAL
