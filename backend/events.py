"""Shapes of the webhooks that change the prompt bank, checked before they are answered.

Annotation webhooks are applied after the response (Label Studio waits only 1 s for
it), so a malformed payload would otherwise be accepted and fail later in a log line;
checking the fields the prompt bank reads gives API users a 422 naming the problem.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

Id = Annotated[int, Field(strict=True, ge=0, lt=2**63)]  # Label Studio ids are positive bigints


class _Item(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id


class _Task(_Item):
    data: dict[str, Any]


class _Annotation(_Item):
    task: Id
    result: list[dict[str, Any]] | None = None


_ONE = {"annotation": _Annotation, "task": _Task}
_FIELDS: dict[str, dict[str, Any]] = {
    "ANNOTATION_CREATED": _ONE,
    "ANNOTATION_UPDATED": _ONE,
    "ANNOTATIONS_CREATED": {"annotation": list[_Annotation], "task": list[_Task]},
    "ANNOTATIONS_DELETED": {"annotations": list[_Item] | None},
    "TASKS_DELETED": {"tasks": list[_Item] | None},
}
_ADAPTERS = {action: {name: TypeAdapter(kind) for name, kind in fields.items()} for action, fields in _FIELDS.items()}


def checked_event(action: str, data: dict) -> dict:
    """``data`` with the fields ``action`` reads validated; ValueError naming the first problem."""
    checked = dict(data)
    for name, adapter in _ADAPTERS.get(action, {}).items():
        try:
            checked[name] = adapter.dump_python(adapter.validate_python(data.get(name)))
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in (name, *error["loc"]) if not str(part).startswith("_"))
            raise ValueError(f"{where}: {error['msg'].split(' or instance of ')[0]}") from None
    return checked
