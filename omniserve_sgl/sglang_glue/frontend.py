"""An SGLang frontend backend that tags every generation request with an OmniServe service class.

:class:`OmniServeEndpoint` is SGLang's :class:`~sglang.lang.backend.runtime_endpoint.RuntimeEndpoint`
(the backend of ``@sgl.function`` programs: ``run``, ``run_batch``, ``gen``, ``select``, prefix caching)
whose requests to the server's ``/generate`` carry the service class twice: in the body, as
``sampling_params.custom_params[SERVICE_CLASS_KEY]``, and as the HTTP header ``SERVICE_CLASS_HEADER``.
Other requests (``/get_model_info``, ``/flush_cache``, ...) go out exactly as RuntimeEndpoint sends them.

How: RuntimeEndpoint builds each request dict inline and posts it through the function
``http_request``, looked up at call time in its module's globals, and that helper takes no extra
headers. So this class runs copies of RuntimeEndpoint's posting methods, same code objects, whose
globals map ``http_request`` to a sender that adds the marker; SGLang's module and every other
RuntimeEndpoint are left untouched, and new upstream methods that post through the helper are
covered without copying their code here.
"""

from __future__ import annotations

import functools
import inspect
import json
import ssl
import types
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

import requests
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.utils import HttpResponse

from omniserve_sgl.service_class import (
    SERVICE_CLASS_HEADER,
    SERVICE_CLASS_KEY,
    SERVICE_CLASSES,
    parse_service_class,
)

__all__ = [
    "SERVICE_CLASSES",
    "SERVICE_CLASS_HEADER",
    "SERVICE_CLASS_KEY",
    "OmniServeEndpoint",
    "mark_generate_body",
]


def _with_class(sampling_params: dict | None, service_class: str) -> dict:
    """A copy of ``sampling_params`` whose custom_params also carry the service class."""
    params = dict(sampling_params or {})
    # The endpoint's class wins over a caller's value for the key: the header says the same.
    params["custom_params"] = {**(params.get("custom_params") or {}), SERVICE_CLASS_KEY: service_class}
    return params


def mark_generate_body(body: dict | None, service_class: str) -> dict:
    """A copy of a ``/generate`` request body carrying ``service_class`` in every sampling_params.

    Other custom_params keys are kept; the caller's dicts are not modified. A list of sampling_params
    (one per prompt of a batch) is marked item by item.
    """
    body = dict(body or {})
    params = body.get("sampling_params")
    if isinstance(params, list):
        body["sampling_params"] = [_with_class(p, service_class) for p in params]
    else:
        body["sampling_params"] = _with_class(params, service_class)
    return body


def _is_generate(url: str) -> bool:
    return urlsplit(url).path.rstrip("/").endswith("/generate")


def _marked_http_request(service_class: str, real_http_request: Callable) -> Callable:
    """A stand-in for ``sglang.utils.http_request`` that marks ``/generate`` requests with the class.

    The signature is upstream's, so a call with an argument added there fails loudly instead of losing
    it. The transport for ``/generate`` mirrors upstream's (urllib, or requests when streaming), since
    upstream's has no way to add a header.
    """

    def http_request(url, json=None, stream=False, api_key=None, verify=None, method=None):
        body = json  # upstream's parameter name; it hides the json module in here, hence _dumps
        if not _is_generate(url):
            return real_http_request(url, json=body, stream=stream, api_key=api_key, verify=verify, method=method)
        body = mark_generate_body(body, service_class)
        headers = {"Content-Type": "application/json; charset=utf-8", SERVICE_CLASS_HEADER: service_class}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        if stream:
            # Like upstream, `verify` is not passed on the streaming path.
            return requests.post(url, json=body, stream=True, headers=headers)
        req = urllib.request.Request(url, data=_dumps(body), headers=headers, method=method)
        context = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else None
        try:
            return HttpResponse(urllib.request.urlopen(req, context=context))
        except urllib.error.HTTPError as e:
            return HttpResponse(e)

    return http_request


def _dumps(body: dict) -> bytes:
    """The request body as upstream's helper encodes it."""
    return json.dumps(body).encode("utf-8")


def _names_global(code: types.CodeType, name: str) -> bool:
    """Whether ``code`` or a function nested in it may read the global ``name``."""
    return name in code.co_names or any(
        isinstance(c, types.CodeType) and _names_global(c, name) for c in code.co_consts
    )


# RuntimeEndpoint's methods that post through `http_request`; __init__ only asks for the model info.
_POSTING_METHODS = tuple(
    sorted(
        name
        for name, fn in vars(RuntimeEndpoint).items()
        if name != "__init__" and isinstance(fn, types.FunctionType) and _names_global(fn.__code__, "http_request")
    )
)
# Those known to send /generate (select goes through _generate_http_request). If SGLang stops posting
# them through the helper, fail at import rather than send unmarked requests.
_GENERATE_SENDERS = {
    "cache_prefix",
    "commit_lazy_operations",
    "fill_image",
    "generate",
    "generate_stream",
    "_generate_http_request",
}
if _GENERATE_SENDERS - set(_POSTING_METHODS):
    raise ImportError(
        "sglang's RuntimeEndpoint no longer posts through http_request in "
        f"{sorted(_GENERATE_SENDERS - set(_POSTING_METHODS))}; omniserve_sgl.sglang_glue.frontend needs updating"
    )


@functools.cache
def _marked_methods(service_class: str) -> dict[str, types.FunctionType]:
    """Copies of the posting methods that send through a marking ``http_request`` (one set per class)."""
    methods = {}
    for name in _POSTING_METHODS:
        fn = vars(RuntimeEndpoint)[name]
        scope = dict(fn.__globals__)
        scope["http_request"] = _marked_http_request(service_class, fn.__globals__["http_request"])
        copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__kwdefaults__ = fn.__kwdefaults__
        copy.__qualname__ = fn.__qualname__
        methods[name] = copy
    return methods


class OmniServeEndpoint(RuntimeEndpoint):
    """SGLang's RuntimeEndpoint whose ``/generate`` requests carry an OmniServe service class.

    Use it wherever a RuntimeEndpoint goes, e.g. ``sgl.set_default_backend(OmniServeEndpoint(url))``
    or ``prog.run(backend=...)``. Every ``/generate`` request it sends (``gen``, ``select``, streaming,
    ``run_batch``, prefix caching) has ``sampling_params.custom_params[SERVICE_CLASS_KEY]`` set to the
    class (other custom_params keys kept) and the header ``SERVICE_CLASS_HEADER: <class>``.

    Args:
        url: The SGLang server's base URL, e.g. ``"http://127.0.0.1:30000"``.
        service_class: ``"ls"`` (latency-sensitive) or ``"be"`` (best-effort), case-insensitive
            (normalised by :func:`omniserve_sgl.service_class.parse_service_class`).
        **kwargs: Passed to RuntimeEndpoint: ``api_key``, ``verify``, ``chat_template_name``.

    Raises:
        ValueError: ``service_class`` is not one of ``SERVICE_CLASSES`` (checked before any request).
        RuntimeError, urllib.error.URLError: from RuntimeEndpoint, when the server's
            ``/get_model_info`` fails or the server cannot be reached.
    """

    def __init__(self, url: str, service_class: str = "be", **kwargs):
        self._service_class = parse_service_class(service_class)
        super().__init__(url, **kwargs)

    @property
    def service_class(self) -> str:
        """The service class, lower case, that this endpoint's ``/generate`` requests carry."""
        return self._service_class


def _dispatch(name: str):
    original = vars(RuntimeEndpoint)[name]

    # A class attribute (not per-instance state), so subclasses' overrides and their super() calls
    # resolve as usual and still reach the marking copy.
    if inspect.isgeneratorfunction(original):  # stays a generator function for inspect's sake

        @functools.wraps(original)
        def method(self, *args, **kwargs):
            return (yield from _marked_methods(self._service_class)[name](self, *args, **kwargs))

    else:

        @functools.wraps(original)
        def method(self, *args, **kwargs):
            return _marked_methods(self._service_class)[name](self, *args, **kwargs)

    return method


for _name in _POSTING_METHODS:
    setattr(OmniServeEndpoint, _name, _dispatch(_name))
del _name
