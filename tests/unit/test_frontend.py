"""OmniServeEndpoint against a small real HTTP server that answers like SGLang and records every request.

The server "tokenizes" one character per token (token id = code point). In select's scoring requests it
gives every token of a text containing FAVOURED a logprob of -0.1 and other tokens -2.0, so select's
decision shows that the server's answers made it back through the endpoint.
"""

import json
import re
import threading
import types
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sglang as sgl
import sglang.utils
from sglang.lang.backend import runtime_endpoint

from omniserve_sgl.sglang_glue.frontend import (
    SERVICE_CLASS_HEADER,
    SERVICE_CLASS_KEY,
    SERVICE_CLASSES,
    OmniServeEndpoint,
)

MODEL_PATH = "omniserve-test/tiny-model"
GEN_TEXT = " Paris"
STREAM_CHUNKS = (" Par", "is")
FAVOURED = "blue"
FAIL_PROMPT = "please fail"
# Over 64 characters, so run_batch pre-caches it (sglang caches traced constant prefixes longer than that).
PREFIX = "You are a careful assistant. Answer every question briefly and truthfully.\n"


def _logprobs(tokens, start, with_text, logprob):
    """SGLang's [logprob, token id, text] triples for ``tokens[start:]``; a sequence's first token has None."""
    return [[None if i == 0 else logprob, ord(t), t if with_text else None] for i, t in enumerate(tokens[start:], start)]


def _result(body, text=None, ids=None, index=0):
    """One SGLang /generate result for the ``index``-th prompt, given as text or token ids."""
    prompt = text if text is not None else "".join(map(chr, ids))
    params = body.get("sampling_params") or {}
    if isinstance(params, list):  # one per prompt of a batch
        params = params[index]
    max_new = params.get("max_new_tokens", 128)
    out = "" if max_new == 0 else GEN_TEXT
    meta = {
        "id": uuid.uuid4().hex,
        "prompt_tokens": len(prompt),
        "completion_tokens": len(out),
        "cached_tokens": 0,
        "finish_reason": {"type": "length", "length": max_new},
        "e2e_latency": 0.001,
    }
    if body.get("return_logprob"):
        # Unconditional requests (input_ids) score every token alike.
        logprob = (-0.1 if FAVOURED in prompt else -2.0) if text is not None else -1.0
        meta["input_token_logprobs"] = _logprobs(
            prompt, body.get("logprob_start_len") or 0, body.get("return_text_in_logprobs"), logprob
        )
        meta["output_token_logprobs"] = []
    return {"text": out, "meta_info": meta}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        req = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
        }
        with self.server.lock:
            self.server.requests.append(req)
        return body

    def _send_json(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._route(self._record())

    def do_POST(self):
        self._route(self._record())

    def _route(self, body):
        if self.path == "/get_model_info":
            self._send_json({"model_path": MODEL_PATH, "tokenizer_path": MODEL_PATH, "is_generation": True})
        elif self.path == "/flush_cache":
            self._send_json({"ok": True})
        elif self.path == "/generate":
            self._generate(body or {})
        else:
            self._send_json({"error": {"message": f"no route {self.path}"}}, status=404)

    def _generate(self, body):
        text, ids = body.get("text"), body.get("input_ids")
        if text == FAIL_PROMPT:
            self._send_json({"error": {"message": "refused by test server"}}, status=400)
        elif body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            acc = ""
            for chunk in STREAM_CHUNKS:
                acc += chunk
                meta = {"id": "s", "prompt_tokens": len(text), "completion_tokens": len(acc)}
                self.wfile.write(f"data: {json.dumps({'text': acc, 'meta_info': meta})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
        elif isinstance(text, list):
            self._send_json([_result(body, text=t, index=i) for i, t in enumerate(text)])
        elif ids is not None and ids and isinstance(ids[0], list):
            self._send_json([_result(body, ids=x, index=i) for i, x in enumerate(ids)])
        else:
            self._send_json(_result(body, text=text, ids=ids))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def generate_requests(self):
        with self.lock:
            return [r for r in self.requests if r["path"] == "/generate"]


@pytest.fixture(scope="module")
def _server_once():
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(_server_once):
    with _server_once.lock:
        _server_once.requests.clear()
    return _server_once


def assert_all_marked(requests, service_class):
    """Every request (there must be some) carries the class in custom_params and in the header."""
    assert requests, "no /generate request was sent"
    for r in requests:
        assert r["headers"].get(SERVICE_CLASS_HEADER) == service_class, r
        params = r["body"]["sampling_params"]
        for p in params if isinstance(params, list) else [params]:
            assert p["custom_params"][SERVICE_CLASS_KEY] == service_class, r


def assert_unmarked(requests):
    assert requests
    for r in requests:
        assert SERVICE_CLASS_HEADER not in r["headers"], r
        assert "custom_params" not in ((r["body"] or {}).get("sampling_params") or {}), r


@sgl.function
def qa(s, question):
    s += PREFIX + "Question: " + question + "\nAnswer:"
    s += sgl.gen("answer", max_tokens=8, stop="\n")
    s += "\nColour: " + sgl.select("colour", choices=["red", FAVOURED, "green"])


@sgl.function
def qa_unconditional(s, question):
    s += "Question: " + question + "\nColour: "
    s += sgl.select("colour", choices=["red", FAVOURED], choices_method=sgl.unconditional_likelihood_normalized)


@sgl.function
def forked(s):
    s += PREFIX + "Two answers follow.\n"
    branches = s.fork(2)  # a fork of a non-empty state commits the prefix first (commit_lazy_operations)
    for i, b in enumerate(branches):
        b += f"Answer {i}:" + sgl.gen("a", max_tokens=4)
    s += branches[0]["a"] + branches[1]["a"]


@sgl.function
def streamed(s):
    s += "Say a city:" + sgl.gen("city", max_tokens=4)


def test_gen_and_select_are_marked(server):
    ep = OmniServeEndpoint(server.url, service_class="be")
    state = qa.run(question="Capital of France?", backend=ep)

    assert state["answer"] == GEN_TEXT
    assert state["colour"] == FAVOURED
    reqs = server.generate_requests()
    # gen, select's prefix request, select's scoring request
    assert len(reqs) == 3
    assert reqs[0]["body"]["sampling_params"]["max_new_tokens"] == 8
    assert reqs[2]["body"]["return_logprob"] is True
    assert_all_marked(reqs, "be")
    # The rest of the request is what RuntimeEndpoint sends, untouched.
    assert reqs[0]["body"]["text"].startswith(PREFIX)
    assert reqs[0]["body"]["sampling_params"]["stop"] == "\n"
    assert reqs[0]["headers"]["content-type"].startswith("application/json")


def test_default_backend_and_unconditional_select(server):
    ep = OmniServeEndpoint(server.url)  # "be" by default
    assert ep.service_class == "be"
    sgl.set_default_backend(ep)
    try:
        state = qa_unconditional.run(question="Sky?")
    finally:
        sgl.global_config.default_backend = None

    assert state["colour"] == FAVOURED
    reqs = server.generate_requests()
    assert any("input_ids" in r["body"] for r in reqs)  # the unconditional scoring request
    assert len(reqs) == 3
    assert_all_marked(reqs, "be")


def test_run_batch_marks_every_request_including_precache(server):
    ep = OmniServeEndpoint(server.url, service_class="be")
    questions = ["Capital of France?", "Capital of Italy?", "Capital of Spain?", "Capital of Peru?"]
    states = qa.run_batch([{"question": q} for q in questions], backend=ep, num_threads=4)

    assert [s["answer"] for s in states] == [GEN_TEXT] * len(questions)
    assert [s["colour"] for s in states] == [FAVOURED] * len(questions)
    reqs = server.generate_requests()
    precache = [r for r in reqs if r["body"]["text"] == PREFIX + "Question: "]
    assert len(precache) == 1 and precache[0]["body"]["sampling_params"]["max_new_tokens"] == 0
    assert len(reqs) == 1 + 3 * len(questions)
    assert_all_marked(reqs, "be")


def test_fork_commit_and_stream_are_marked(server):
    ep = OmniServeEndpoint(server.url, service_class="be")
    # Without the executor thread: fork() tests the state's text for the commit before syncing, so with
    # the thread the commit is skipped whenever the prefix has not been executed yet (an sglang race).
    state = forked.run(backend=ep, use_thread=False)
    assert state.text().endswith(GEN_TEXT + GEN_TEXT)
    reqs = server.generate_requests()
    commits = [r for r in reqs if r["body"]["text"] == PREFIX + "Two answers follow.\n"]
    assert len(commits) == 1 and commits[0]["body"]["sampling_params"] == {
        "max_new_tokens": 0,
        "custom_params": {SERVICE_CLASS_KEY: "be"},
    }
    assert len(reqs) == 3  # the commit, then one gen per branch
    assert_all_marked(reqs, "be")

    server.requests.clear()
    state = streamed.run(backend=ep, stream=True)
    assert "".join(state.text_iter("city")) == "".join(STREAM_CHUNKS)
    reqs = server.generate_requests()
    assert len(reqs) == 1 and reqs[0]["body"]["stream"] is True
    assert_all_marked(reqs, "be")


def test_explicit_prefix_calls_are_marked(server):
    ep = OmniServeEndpoint(server.url, service_class="be")
    ep.cache_prefix("A long shared system prompt.")
    ep.fill_image(types.SimpleNamespace(text_="Describe:", images_=[]))
    ep.commit_lazy_operations(types.SimpleNamespace(text_="Committed text", images_=[]))

    reqs = server.generate_requests()
    assert [r["body"]["text"] for r in reqs] == ["A long shared system prompt.", "Describe:", "Committed text"]
    for r in reqs:
        assert r["body"]["sampling_params"] == {"max_new_tokens": 0, "custom_params": {SERVICE_CLASS_KEY: "be"}}
    assert_all_marked(reqs, "be")


def test_existing_custom_params_are_kept(server):
    ep = OmniServeEndpoint(server.url, service_class="be")
    data = {
        "text": "hi",
        "sampling_params": {"max_new_tokens": 0, "custom_params": {"user_key": 7, SERVICE_CLASS_KEY: "ls"}},
    }
    ep._generate_http_request(types.SimpleNamespace(images_=[]), data)
    batch = {"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 0, "custom_params": {"k": "v"}}, {}]}
    ep._generate_http_request(types.SimpleNamespace(images_=[]), batch)

    first, second = server.generate_requests()
    # Other keys survive; the endpoint's class wins for its own key, so body and header agree.
    assert first["body"]["sampling_params"]["custom_params"] == {"user_key": 7, SERVICE_CLASS_KEY: "be"}
    assert [p["custom_params"] for p in second["body"]["sampling_params"]] == [
        {"k": "v", SERVICE_CLASS_KEY: "be"},
        {SERVICE_CLASS_KEY: "be"},
    ]
    assert_all_marked([first, second], "be")
    # The caller's dicts are not modified.
    assert data["sampling_params"]["custom_params"] == {"user_key": 7, SERVICE_CLASS_KEY: "ls"}
    assert batch["sampling_params"][1] == {}


def test_upper_case_class_is_normalised(server):
    ls = OmniServeEndpoint(server.url, service_class="LS")
    assert ls.service_class == "ls"
    state = qa.run(question="Capital of France?", backend=ls)
    assert state["colour"] == FAVOURED
    assert_all_marked(server.generate_requests(), "ls")

    # A second endpoint of the other class in the same process keeps its own marker.
    server.requests.clear()
    be = OmniServeEndpoint(server.url, service_class="Be")
    be.cache_prefix("x")
    ls.cache_prefix("y")
    be_req, ls_req = server.generate_requests()
    assert_all_marked([be_req], "be")
    assert_all_marked([ls_req], "ls")


@pytest.mark.parametrize("bad", ["gold", "", "l s", "lsbe", None, 1, -1, float("nan"), ["be"], "bé", "b" * 10_000])
def test_invalid_class_raises_before_contacting_server(server, bad):
    with pytest.raises(ValueError) as err:
        OmniServeEndpoint(server.url, service_class=bad)
    for allowed in SERVICE_CLASSES:
        assert re.search(rf"\b{allowed}\b", str(err.value)), err.value
    assert server.requests == []


def test_only_generate_is_marked_and_api_key_is_kept(server):
    ep = OmniServeEndpoint(server.url, service_class="ls", api_key="secret")
    ep.flush_cache()
    ep.cache_prefix("p")

    by_path = {r["path"]: r for r in server.requests}
    assert set(by_path) == {"/get_model_info", "/flush_cache", "/generate"}
    assert_unmarked([by_path["/get_model_info"], by_path["/flush_cache"]])
    assert_all_marked([by_path["/generate"]], "ls")
    for r in server.requests:
        assert r["headers"]["authorization"] == "Bearer secret"


def test_server_error_surfaces_as_runtime_error(server):
    ep = OmniServeEndpoint(server.url)
    with pytest.raises(RuntimeError, match="refused by test server"):
        ep.cache_prefix(FAIL_PROMPT)
    assert_all_marked(server.generate_requests(), "be")


def test_plain_runtime_endpoint_is_untouched(server):
    OmniServeEndpoint(server.url, service_class="ls").cache_prefix("warm up the marking path")
    server.requests.clear()

    assert runtime_endpoint.http_request is sglang.utils.http_request
    state = qa.run(question="Capital of France?", backend=sgl.RuntimeEndpoint(server.url))
    assert state["colour"] == FAVOURED
    assert_unmarked(server.generate_requests())


def test_subclass_override_calling_super_is_marked(server):
    calls = []

    class Counting(OmniServeEndpoint):
        def generate(self, s, sampling_params):
            calls.append(s.text_)
            return super().generate(s, sampling_params)

    ep = Counting(server.url, service_class="ls")
    state = qa.run(question="Capital of France?", backend=ep)
    assert state["answer"] == GEN_TEXT
    assert state["colour"] == FAVOURED  # waits for the program's last request
    assert len(calls) == 1
    assert_all_marked(server.generate_requests(), "ls")
