#!/usr/bin/env python3
"""Validates payloads against the committed JSON Schemas (python-jsonschema, an
implementation independent of our decoder).

  check_schemas.py samples            every schemas/samples payload: valid ones pass, invalid ones fail
  check_schemas.py records FILE       every JSON line of FILE against the schema named by its "schema" field
"""
import json
import pathlib
import sys

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

ROOT = pathlib.Path(__file__).resolve().parents[2] / "schemas"
BY_NAME = {
    "recstream.recommendations.v1": "recommendations.v1.schema.json",
    "recstream.carousels.v2": "carousels.v2.schema.json",
    "recstream.insights.v1": "insights.v1.schema.json",
}


def registry() -> Registry:
    resources = []
    for path in ROOT.glob("*.schema.json"):
        doc = json.loads(path.read_text())
        resources.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources)


def validator(file_name: str, reg: Registry) -> Draft202012Validator:
    schema = json.loads((ROOT / file_name).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=reg)


SAMPLES = {
    "interaction": "interaction.v1.schema.json",
    "refresh": "refresh.v1.schema.json",
    "catalog": "catalog.v1.schema.json",
}


def samples(reg: Registry) -> int:
    failures = 0
    for folder, schema in SAMPLES.items():
        failures += sample_folder(folder, validator(schema, reg))
    return failures


def sample_folder(folder: str, v: Draft202012Validator) -> int:
    failures = 0
    for kind in ("valid", "invalid"):
        for path in sorted((ROOT / "samples" / folder / kind).glob("*.json")):
            text = path.read_text().splitlines()[0]
            try:
                errors = list(v.iter_errors(json.loads(text)))
            except json.JSONDecodeError:
                errors = ["not JSON"]
            ok = (not errors) if kind == "valid" else bool(errors)
            if not ok:
                failures += 1
                print(f"FAIL {folder}/{kind}/{path.name}: {errors[:1]}")
    return failures


def records(path: str, reg: Registry) -> int:
    validators = {name: validator(f, reg) for name, f in BY_NAME.items()}
    failures = 0
    count = 0
    for line in pathlib.Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        errors = list(validators[rec["schema"]].iter_errors(rec))
        count += 1
        if errors:
            failures += 1
            print(f"FAIL {rec['schema']} user {rec.get('user_id')}: {errors[0].message} at {list(errors[0].path)}")
    if count == 0:
        print("no records to check")
        return 1
    return failures


def main() -> int:
    reg = registry()
    if sys.argv[1] == "samples":
        failures = samples(reg)
    else:
        failures = records(sys.argv[2], reg)
    print("schemas: " + ("ok" if failures == 0 else f"{failures} failure(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
