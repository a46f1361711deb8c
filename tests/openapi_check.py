"""Checks HTTP exchanges against docs/openapi.json: python3 openapi_check.py SPEC EXCHANGES.jsonl,
where each line is {"method", "path", "status", "content_type", "body"}. Each must hit a documented
path and method, a documented status, a documented media type, and (JSON) a body that its schema
accepts (jsonschema, Draft 2020-12, which OpenAPI 3.1 schemas are). Prints the problems and exits 1
if there are any; prints the operations seen otherwise."""
import json
import re
import sys

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


def pointer(*parts):
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def main(spec_path, exchanges_path):
    spec = json.load(open(spec_path))
    registry = Registry().with_resource("urn:openapi", Resource.from_contents(spec, default_specification=DRAFT202012))
    templates = [(re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)) + "$"), p) for p in spec["paths"]]
    problems, seen = [], set()
    for number, line in enumerate(open(exchanges_path), 1):
        x = json.loads(line)
        what = f"{x['method']} {x['path']} → {x['status']}"
        path = x["path"].split("?")[0]
        template = next((t for r, t in templates if r.match(path)), None)
        if template is None:
            problems.append(f"{what}: no such path in the document")
            continue
        operation = spec["paths"][template].get(x["method"].lower())
        if operation is None:
            problems.append(f"{what}: {template} documents no {x['method']}")
            continue
        seen.add(f"{x['method']} {template}")
        status = str(x["status"])
        response = operation["responses"].get(status) or operation["responses"].get("default")
        if response is None:
            problems.append(f"{what}: status {status} is not documented (documented: {sorted(operation['responses'])})")
            continue
        content = response.get("content")
        if not content:
            if x["body"]:
                problems.append(f"{what}: documented without a body, answered {x['body'][:200]!r}")
            continue
        media = (x["content_type"] or "").split(";")[0].strip()
        if media not in content:
            problems.append(f"{what}: media type {media!r} is not documented (documented: {sorted(content)})")
            continue
        if media != "application/json":
            continue
        try:
            body = json.loads(x["body"])
        except ValueError as e:
            problems.append(f"{what}: not JSON ({e}): {x['body'][:200]!r}")
            continue
        schema = {"$ref": "urn:openapi#" + pointer("paths", template, x["method"].lower(), "responses", status if status in operation["responses"] else "default", "content", media, "schema")}
        for error in Draft202012Validator(schema, registry=registry).iter_errors(body):
            at = "/".join(str(p) for p in error.absolute_path)
            problems.append(f"{what}: body at /{at}: {error.message[:300]}")
    if problems:
        print("\n".join(problems))
        return 1
    print(json.dumps(sorted(seen)))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
