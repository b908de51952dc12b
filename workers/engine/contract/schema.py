"""JSON Schema from the contract's declarations: one generator, one place for its choices.

Titles are left out (a component's name already says it); everything else is what pydantic
derives from the types and their ``Field`` metadata. :func:`components` collects the ``$defs``
of several shapes under one ``ref_template``, which is how the OpenAPI document and the report
schema are built.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import core_schema

Schema = dict[str, Any]
COMPONENTS = "#/components/schemas/{model}"


class ContractJsonSchema(GenerateJsonSchema):
    """pydantic's generator without titles: names live in the components' keys."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def dataclass_schema(self, schema: core_schema.DataclassSchema) -> Schema:
        result = super().dataclass_schema(schema)
        result.pop("title", None)
        return result

    def model_schema(self, schema: core_schema.ModelSchema) -> Schema:
        result = super().model_schema(schema)
        result.pop("title", None)
        return result


def schema_of(
    shape: Any, *, ref_template: str = COMPONENTS, mode: JsonSchemaMode = "validation"
) -> Schema:
    """The JSON Schema of one contract shape (a pydantic model or a dataclass)."""
    schema: Schema = TypeAdapter(shape).json_schema(
        schema_generator=ContractJsonSchema, ref_template=ref_template, mode=mode
    )
    return schema


def components(
    shapes: Iterable[Any], *, ref_template: str = COMPONENTS, mode: JsonSchemaMode = "validation"
) -> dict[str, Schema]:
    """Every named shape of ``shapes`` and of what they refer to, as a components table
    (``{name: schema}``); a shape's own name is its class name."""
    table: dict[str, Schema] = {}
    for shape in shapes:
        schema = schema_of(shape, ref_template=ref_template, mode=mode)
        for name, definition in schema.pop("$defs", {}).items():
            _add(table, name, definition)
        _add(table, shape.__name__, schema)
    return table


def _add(table: dict[str, Schema], name: str, schema: Schema) -> None:
    if name in table and table[name] != schema:  # pragma: no cover - a declaration error
        raise RuntimeError(f"two contract shapes are named {name}")
    table[name] = schema


def rendered(schema: Schema) -> Schema:
    """An object schema as a response renders it: every property present, no defaults (a
    default only speaks about what a request may leave out)."""
    properties = {
        name: {k: v for k, v in prop.items() if k != "default"}
        for name, prop in schema["properties"].items()
    }
    return {**schema, "properties": properties, "required": list(properties)}
