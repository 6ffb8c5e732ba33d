"""Export the message models' JSON Schemas and the MQTT topics' AsyncAPI document, or check.

Both go to schemas/json, one JSON Schema per message model and one AsyncAPI document.

    python -m schemas.export            # write schemas/json/<kind>.schema.json, asyncapi.json
    python -m schemas.export --check    # exit 1 and list the files that differ

The schemas describe the JSON payloads that `model.model_dump_json()` produces (what
the gateway publishes on MQTT), so they are generated in serialization mode. Output is
deterministic: sorted keys, two-space indent, a trailing newline. The AsyncAPI document
(`schemas.asyncapi`) embeds the same schemas; its keys keep the document's reading order.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel

from schemas.models import MODELS_BY_KIND, SCHEMA_VERSION

SCHEMA_DIR: Final = Path(__file__).resolve().parent / "json"
SCHEMA_SUFFIX: Final = ".schema.json"
JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


def schema_id(kind: str) -> str:
    """The `$id` of a kind's schema: a stable name, not a location to fetch."""
    return f"urn:pumpgw:schema:{kind}:v{SCHEMA_VERSION}"


def schema_for(kind: str, model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema of one model's serialized payload, with `$schema`, `$id` and title."""
    schema = model.model_json_schema(mode="serialization")
    schema["$schema"] = JSON_SCHEMA_DIALECT
    schema["$id"] = schema_id(kind)
    schema["title"] = f"pumpgw {kind} message, schema version {SCHEMA_VERSION}"
    return schema


def render(schema: dict[str, Any]) -> str:
    """Deterministic text of a schema."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render_document(document: dict[str, Any]) -> str:
    """Deterministic text of the AsyncAPI document, in the order it was built."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def expected_files() -> dict[str, str]:
    """File name to contents for every kind in MODELS_BY_KIND, then the AsyncAPI document."""
    # Imported here: the document reads the gateway's topics and MQTT settings, which users of
    # schema_for alone (the models' tests) need not load.
    from schemas import asyncapi

    schemas = {kind: schema_for(kind, model) for kind, model in sorted(MODELS_BY_KIND.items())}
    files = {f"{kind}{SCHEMA_SUFFIX}": render(schema) for kind, schema in schemas.items()}
    files[asyncapi.DOCUMENT_NAME] = render_document(asyncapi.document(schemas))
    return files


def drift(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of files that are missing, differ, or are stale (no longer a model)."""
    expected = expected_files()
    present = {p.name for p in directory.glob(f"*{SCHEMA_SUFFIX}")}
    changed = [
        name
        for name, text in expected.items()
        if not (directory / name).is_file()
        or (directory / name).read_text(encoding="utf-8") != text
    ]
    return sorted(changed + sorted(present - expected.keys()))


def write(directory: Path = SCHEMA_DIR) -> list[str]:
    """Write every schema, remove stale ones; return the names written or removed."""
    directory.mkdir(parents=True, exist_ok=True)
    touched = drift(directory)
    expected = expected_files()
    for name in touched:
        path = directory / name
        if name in expected:
            path.write_text(expected[name], encoding="utf-8")
        else:
            path.unlink()
    return touched


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 when up to date (or written), 1 when --check finds drift."""
    parser = argparse.ArgumentParser(
        prog="python -m schemas.export", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on drift")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="output directory")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift(args.dir)
        for name in stale:
            print(f"drift: {args.dir / name}", file=sys.stderr)
        if stale:
            print("run `python -m schemas.export` to regenerate", file=sys.stderr)
        return 1 if stale else 0
    for name in write(args.dir):
        print(f"wrote {args.dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
