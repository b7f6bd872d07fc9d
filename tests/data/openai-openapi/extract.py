"""Cut the schemas the tests validate against out of openai/openai-openapi's openapi.json.

    git -C MIRROR show COMMIT:openapi.json | python tests/data/openai-openapi/extract.py > tests/data/openai-openapi/schemas.json

Keeps the named components and every component they reference, unchanged.
"""
import json
import sys

ROOTS = ["CreateCompletionRequest", "CreateCompletionResponse", "CreateChatCompletionRequest",
         "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "ErrorResponse",
         "ListModelsResponse", "Model"]


def refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"].rsplit("/", 1)[-1]
        for v in node.values():
            yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


schemas = json.load(sys.stdin)["components"]["schemas"]
keep, todo = {}, list(ROOTS)
while todo:
    name = todo.pop()
    if name not in keep:
        keep[name] = schemas[name]
        todo += refs(keep[name])
json.dump({"components": {"schemas": dict(sorted(keep.items()))}}, sys.stdout, indent=1, sort_keys=False)
