"""OpenAI's published schemas (tests/data/openai-openapi) as jsonschema validators."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema
import referencing

SCHEMAS = Path(__file__).parent / "data" / "openai-openapi" / "schemas.json"


def _nullable(node):
    """OpenAPI 3.0's `nullable: true` as JSON Schema's "or null" (the document still uses it)."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


# Where the published schema is stricter than OpenAI's own legacy completions: their stream chunks carry
# finish_reason null until the last, and an echoed prompt's first token has a null logprob and null
# top_logprobs. These three (and only these) may also be null.
LEGACY_NULLS = ("finish_reason", "token_logprobs", "top_logprobs")


def _legacy_nulls(document: dict) -> dict:
    choice = document["components"]["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
    choice["properties"]["finish_reason"] = {"anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]}
    logprobs = choice["properties"]["logprobs"]["anyOf"][0]["properties"]
    for name in LEGACY_NULLS[1:]:
        logprobs[name]["items"] = {"anyOf": [logprobs[name]["items"], {"type": "null"}]}
    return document


@functools.cache
def _document() -> dict:
    return _legacy_nulls(_nullable(json.loads(SCHEMAS.read_text())))


def schema_names() -> list[str]:
    return list(_document()["components"]["schemas"])


def request_fields(name: str) -> dict:
    """The properties of a request schema, through its allOf parts."""
    schemas = _document()["components"]["schemas"]
    fields = {}
    for part in schemas[name].get("allOf", [schemas[name]]):
        ref = part.get("$ref")
        fields.update(request_fields(ref.rsplit("/", 1)[-1]) if ref else part.get("properties", {}))
    return fields


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    resource = referencing.Resource.from_contents(_document(), default_specification=referencing.jsonschema.DRAFT202012)
    registry = referencing.Registry().with_resource("openapi.json", resource)
    schema = {"$ref": f"openapi.json#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(name: str, obj: object) -> None:
    """Raise jsonschema.ValidationError (with the path of the first problem) unless `obj` is a `name`."""
    errors = sorted(_validator(name).iter_errors(obj), key=lambda e: len(list(e.path)))
    if errors:
        raise errors[0]
