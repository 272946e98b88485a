"""One ``--omniserve`` server for the whole package (the abort matrix, then the short soak): a BE KV
pool of 100 pages, so that two long BE requests fill it and a third waits, and prefill chunks of
64 tokens, so that a long prompt stays in its prefill long enough to be aborted there."""

from __future__ import annotations

import pytest

from omniserve_sgl.bench.launch import SGLangServer
from omniserve_sgl.config import OmniServeConfig
from tests.serving.conftest import model, model_path, prompts, tokenizer  # noqa: F401 - shared fixtures

PAGE = OmniServeConfig().page_size
POOL_PAGES = 1664 // PAGE  # room for a 24-chunk BE prompt (test_aborts), in pages of the default size
CHUNK = 64


@pytest.fixture(scope="package")
def soak_server(model_path, model, latency_profile):  # noqa: F811 - the imported fixtures
    """The SLO controller on (it defers BE rows and gates BE prefill under the aborts and kills);
    BE requests decode on the CPU worker, the path the aborts and kills are about."""
    with SGLangServer(model_path, "--omniserve", "--omniserve-cpu-kv-gb", model.be_pool_gb(POOL_PAGES),
                      "--chunked-prefill-size", str(CHUNK), "--enable-metrics", "--omniserve-profile",
                      str(latency_profile.path), "--omniserve-be-placement", "cpu") as s:
        yield s
