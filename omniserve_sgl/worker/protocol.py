"""Messages between the CPU attention client and worker: small dataclasses encoded with orjson.

Only descriptors cross ZeroMQ (segment paths, slot numbers, row and page counts); tensors stay in
shared memory (the BE KV pool and the staging slots). Every message gets a :class:`Reply`, but for
an ``Attend`` that succeeds while its client busy-polls shared memory. An ``Attend`` is announced in
its staging slot's job words and completed in its done words (``worker.staging``); each side skips
its ZeroMQ message while the other says (in the slot's watch words) that it is polling. The worker
runs each job once, whichever way it saw it first.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import orjson


class ProtocolError(ValueError):
    """A message that is not valid JSON, names an unknown op, or lacks or mistypes a field."""


@dataclass
class Attach:
    """Map a shared segment under ``name``: ``kind`` is ``"kv_pool"`` or ``"staging"``; ``handle``
    is the owner's ``handle()`` dict. A staging area names the ``pool`` its slots' doorbell jobs
    attend over, attached before it."""

    seq: int
    name: str
    kind: str
    handle: dict
    pool: str = ""
    op: str = "attach"


@dataclass
class Detach:
    """Unmap the segment ``name``."""

    seq: int
    name: str
    op: str = "detach"


@dataclass
class Attend:
    """Decode attention of ``num_rows`` BE rows at ``layer`` of pool ``pool``; inputs and outputs in
    staging segment ``staging``, slot ``slot``. With ``append_kv`` the rows' new K/V (staged) is
    written into the pool first. ``method``: ``"kernel"`` (omniserve's decode kernel) or ``"sdpa"``
    (torch SDPA row by row, the math of SGLang's torch_native backend; its LSE slot is left as is)."""

    seq: int
    pool: str
    staging: str
    slot: int
    layer: int
    num_rows: int
    num_pages: int
    append_kv: bool
    sm_scale: float
    method: str = "kernel"
    op: str = "attend"


@dataclass
class Hello:
    """The first message of a client: the token its worker was started with (``TOKEN_ENV``). A
    worker started with a token answers nothing else from a peer before that peer's Hello."""

    seq: int
    token: str
    op: str = "hello"


@dataclass
class Ping:
    seq: int
    op: str = "ping"


@dataclass
class Shutdown:
    seq: int
    op: str = "shutdown"


@dataclass
class Reply:
    """The worker's answer to message ``seq`` (-1 when the request could not be parsed)."""

    seq: int
    ok: bool
    error: str | None = None
    kernel_us: float = 0.0
    op: str = "reply"


TOKEN_ENV = "OMNISERVE_WORKER_TOKEN"  # the worker's token, set in its environment by the client that starts it
_TYPES = {cls.__dataclass_fields__["op"].default: cls
          for cls in (Attach, Detach, Attend, Hello, Ping, Shutdown, Reply)}
_PY_TYPES = {"int": int, "str": str, "bool": bool, "float": (int, float), "dict": dict}
# Per message class: its field names, and (name, annotation, accepted types) of the checked fields.
_SCHEMA = {
    cls: ({f.name for f in fields(cls)}, [(f.name, f.type, _PY_TYPES[f.type]) for f in fields(cls) if f.type in _PY_TYPES])
    for cls in _TYPES.values()
}


def encode(msg) -> bytes:
    return orjson.dumps(msg)


def decode(data: bytes):
    """Parses a message into its dataclass.

    Raises:
        ProtocolError: malformed JSON, unknown op, missing, extra or mistyped fields.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"message is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(obj).__name__}")
    cls = _TYPES.get(obj.get("op"))
    if cls is None:
        raise ProtocolError(f"unknown op {obj.get('op')!r}; expected one of {sorted(_TYPES)}")
    names, checked = _SCHEMA[cls]
    if set(obj) - names:
        raise ProtocolError(f"{cls.__name__} has no fields {sorted(set(obj) - names)}")
    try:
        msg = cls(**obj)
    except TypeError as e:
        raise ProtocolError(f"bad {cls.__name__}: {e}") from None
    for name, annotation, want in checked:
        val = getattr(msg, name)
        if not isinstance(val, want) or (want is int and isinstance(val, bool)):
            raise ProtocolError(f"{cls.__name__}.{name} must be {annotation}, got {val!r}")
    return msg
