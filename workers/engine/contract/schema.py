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


def rendered(schema: Schema, *, every_property: bool = True) -> Schema:
    """An object schema as a response renders it: no defaults (a default only speaks about
    what a request may leave out) and, with ``every_property``, every property present."""
    if "properties" not in schema:
        return schema
    properties = {
        name: {k: v for k, v in prop.items() if k != "default"}
        for name, prop in schema["properties"].items()
    }
    required = list(properties) if every_property else schema.get("required", [])
    return {**schema, "properties": properties, **({"required": required} if required else {})}


def name_enums(
    table: dict[str, Schema], enums: dict[str, Any], *, ref_template: str = COMPONENTS
) -> dict[str, Schema]:
    """``table`` with each of ``enums`` (name -> a Literal type) as a component of its own and
    every inline copy of it replaced by a reference, so a nullable one reads
    ``anyOf: [{$ref}, {type: null}]`` and a client generator makes one type of it."""
    named = {name: schema_of(shape) for name, shape in enums.items()}

    def replace(node: Any) -> Any:
        if isinstance(node, dict):
            for name, schema in named.items():
                if node.get("enum") == schema["enum"] and node.get("type") == schema["type"]:
                    rest = {k: v for k, v in node.items() if k not in ("enum", "type", "default")}
                    return {"$ref": ref_template.format(model=name), **rest}
            return {k: replace(v) for k, v in node.items()}
        if isinstance(node, list):
            return [replace(v) for v in node]
        return node

    return {**{k: replace(v) for k, v in table.items()}, **named}
