"""Service classes and how a request names its class and its own SLOs.

A request is BE when it says so; everything else is LS. The marker travels inside
``sampling_params.custom_params`` (SGLang forwards that free-form dict to the scheduler), or as an
HTTP header that the tokenizer-side hook copies into it. An LS request may carry its own TTFT and
TPOT SLOs there too (``omniserve_ttft_slo``, ``omniserve_tpot_slo``, seconds).
"""

from __future__ import annotations

import json
import math

LS = "ls"
BE = "be"
SERVICE_CLASSES = (LS, BE)
SERVICE_CLASS_KEY = "omniserve_class"  # in sampling_params.custom_params, and the metrics label
SERVICE_CLASS_HEADER = "x-omniserve-class"
TTFT_SLO_KEY = "omniserve_ttft_slo"
TPOT_SLO_KEY = "omniserve_tpot_slo"


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


def slos_of_custom_params(custom_params: object) -> tuple[float | None, float | None]:
    """A request's own ``(TTFT SLO, TPOT SLO)``, s, from its ``custom_params`` (``None`` where it
    sets none: the server's ``--omniserve-ttft-slo`` / ``--omniserve-tpot-slo`` apply).

    Raises:
        ValueError: a value that is not a positive finite JSON number, or an SLO on a BE request
            (BE work has none: it runs in the LS SLOs' slack); the message says what to send.
    """
    if not isinstance(custom_params, dict):
        return None, None
    out = []
    for key in (TTFT_SLO_KEY, TPOT_SLO_KEY):
        value = custom_params.get(key)
        if value is not None and not (isinstance(value, int | float) and not isinstance(value, bool)
                                      and math.isfinite(value) and value > 0):
            raise ValueError(f"{key} must be a positive number of seconds, got {_shown(value)}")
        out.append(None if value is None else float(value))
    if any(v is not None for v in out) and class_of_custom_params(custom_params) == BE:
        raise ValueError(f"a BE request has no SLO of its own (BE work runs in the LS requests' slack): drop "
                         f"{TTFT_SLO_KEY}/{TPOT_SLO_KEY}, or mark the request {LS}")
    return out[0], out[1]
