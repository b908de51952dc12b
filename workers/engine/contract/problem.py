"""The RFC 9457 problem every error response of the API is (``application/problem+json``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class Problem(BaseModel):
    """An RFC 9457 problem; routes add fields of their own."""

    model_config = ConfigDict(extra="allow")

    type: Annotated[str, Field(json_schema_extra={"format": "uri-reference"})]
    title: str
    status: Annotated[int, Field(ge=400, le=599)]
    detail: str
    code: Annotated[str, Field(description="A stable slug; type is the problem base + code.")]
    instance: str | None = None
