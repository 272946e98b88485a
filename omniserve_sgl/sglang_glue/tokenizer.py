"""Tokenizer-side hook (main process): every request leaves with a valid service-class marker."""

from __future__ import annotations

from omniserve_sgl import config
from omniserve_sgl.service_class import (
    SERVICE_CLASS_HEADER,
    SERVICE_CLASS_KEY,
    class_of_custom_params,
    parse_service_class,
    slos_of_custom_params,
)


def _mark(params: dict | None, header_class: str | None) -> tuple[dict, str]:
    params = dict(params or {})
    custom = params.get("custom_params")
    if custom is not None and not isinstance(custom, dict):
        raise ValueError(f"sampling_params.custom_params must be a JSON object, got {type(custom).__name__}")
    custom = dict(custom or {})
    if header_class is not None and SERVICE_CLASS_KEY not in custom:
        custom[SERVICE_CLASS_KEY] = header_class
    cls = class_of_custom_params(custom)
    slos_of_custom_params(custom)
    if SERVICE_CLASS_KEY in custom:
        custom[SERVICE_CLASS_KEY] = cls  # normalised ("BE" -> "be") for the scheduler
        params["custom_params"] = custom
    return params, cls


def generate_request(self, obj, request=None):
    """BEFORE ``TokenizerManager.generate_request``: validates the service class and own SLOs of a
    generate request, copies the ``x-omniserve-class`` header into ``sampling_params.custom_params`` (a
    marker in the body wins), and labels the request for per-class metrics.

    Raises:
        ValueError: an unknown class or a bad SLO (SGLang answers HTTP 400 with the message).
    """
    if not config.current().enabled or not hasattr(obj, "sampling_params"):
        return  # plain SGLang, or an embedding request
    header = request.headers.get(SERVICE_CLASS_HEADER) if request is not None else None
    header_class = parse_service_class(header) if header is not None else None
    sp = obj.sampling_params
    if isinstance(sp, list):
        marked = [_mark(p, header_class) for p in sp]
        obj.sampling_params = [p for p, _ in marked]
        classes = {c for _, c in marked}
    else:
        obj.sampling_params, cls = _mark(sp, header_class)
        classes = {cls}
    if len(classes) == 1:
        labels = dict(getattr(obj, "custom_labels", None) or {})
        labels[SERVICE_CLASS_KEY] = classes.pop()
        obj.custom_labels = labels
    return


async def serve_generate_request(original, obj, request):
    """AROUND ``http_server.serve_generate_request`` (the HTTP server's ``/generate``): a bad
    marker or SLO is refused with HTTP 400 before a stream starts. SGLang answers an error raised inside
    a streamed ``/generate`` with 200 and an error event, and its abort task then trips over the
    request it never normalised (``GenerateReqInput.is_single``), dropping the connection."""
    try:
        generate_request(None, obj, request)  # idempotent: the tokenizer hook marks it again
    except ValueError as e:
        from sglang.srt.entrypoints.http_server import _create_error_response

        return _create_error_response(e)
    return await original(obj, request)
