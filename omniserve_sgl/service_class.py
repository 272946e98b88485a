"""Service classes and how a request names its class.

A request is BE when it says so; everything else is LS. The marker travels inside
``sampling_params.custom_params`` (SGLang forwards that free-form dict to the scheduler), or as an
HTTP header that the tokenizer-side hook copies into it.
"""

from __future__ import annotations

LS = "ls"
BE = "be"
SERVICE_CLASSES = (LS, BE)
SERVICE_CLASS_KEY = "omniserve_class"  # in sampling_params.custom_params, and the metrics label
SERVICE_CLASS_HEADER = "x-omniserve-class"


def parse_service_class(value: object) -> str:
    """Normalises a service-class marker (``"be"``, ``"LS"``, ...) to ``"ls"`` or ``"be"``.

    Raises:
        ValueError: anything else; the message names the allowed values.
    """
    if isinstance(value, str) and value.strip().lower() in SERVICE_CLASSES:
        return value.strip().lower()
    raise ValueError(
        f"unknown {SERVICE_CLASS_KEY} {value!r}: use one of {', '.join(SERVICE_CLASSES)} "
        f"(in sampling_params.custom_params, or the {SERVICE_CLASS_HEADER} header)"
    )


def class_of_custom_params(custom_params: object) -> str:
    """The class a request's ``custom_params`` marks (``"ls"`` when unmarked).

    Raises:
        ValueError: the marker is present but not a known class.
    """
    if isinstance(custom_params, dict) and SERVICE_CLASS_KEY in custom_params:
        return parse_service_class(custom_params[SERVICE_CLASS_KEY])
    return LS
