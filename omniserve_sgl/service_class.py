"""Service classes and how a request names its class.

A request is BE when it says so; everything else is LS. The marker travels inside
``sampling_params.custom_params`` (SGLang forwards that free-form dict to the scheduler), or as an
HTTP header that the tokenizer-side hook copies into it.
"""

from __future__ import annotations

import json

LS = "ls"
BE = "be"
SERVICE_CLASSES = (LS, BE)
SERVICE_CLASS_KEY = "omniserve_class"  # in sampling_params.custom_params, and the metrics label
SERVICE_CLASS_HEADER = "x-omniserve-class"


def _shown(value: object, limit: int = 40) -> str:
    """``value`` as an error message quotes it: a string as its repr, anything else as JSON with
    its JSON type; cut to ``limit`` characters."""
    if isinstance(value, str):
        text, kind = repr(value), ""
    else:
        text = json.dumps(value, ensure_ascii=False, default=repr)
        kind = f" (a JSON {_JSON_TYPES.get(type(value), type(value).__name__)}, not a string)"
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text + kind


_JSON_TYPES = {int: "number", float: "number", bool: "boolean", list: "array", dict: "object", type(None): "null"}


def parse_service_class(value: object) -> str:
    """Normalises a service-class marker (``"be"``, ``" LS "``, ...) to ``"ls"`` or ``"be"``.

    Raises:
        ValueError: anything else (other strings, numbers, null, arrays, ...); the message names the
            allowed values and where they go, and quotes what was sent, cut to 40 characters.
    """
    if isinstance(value, str) and value.strip().lower() in SERVICE_CLASSES:
        return value.strip().lower()
    raise ValueError(
        f"unknown {SERVICE_CLASS_KEY} {_shown(value)}: use one of {', '.join(SERVICE_CLASSES)} "
        f"(a string in sampling_params.custom_params, or the {SERVICE_CLASS_HEADER} header)"
    )


def class_of_custom_params(custom_params: object) -> str:
    """The class a request's ``custom_params`` marks (``"ls"`` when unmarked).

    Raises:
        ValueError: the marker is present but not a known class.
    """
    if isinstance(custom_params, dict) and SERVICE_CLASS_KEY in custom_params:
        return parse_service_class(custom_params[SERVICE_CLASS_KEY])
    return LS
