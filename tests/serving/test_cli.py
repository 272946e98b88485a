"""SGLang's own command line with the package installed: the flags are listed, and a model
omniserve cannot serve is refused before any weights load (the other refusals are unit tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys


def test_flags_show_in_help():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    for flag in ("--omniserve", "--omniserve-cpu-kv-gb", "--omniserve-cpu-threads", "--omniserve-cpu-cores",
                 "--omniserve-cpu-attention", "--omniserve-cpu-page-size", "--omniserve-cpu-spin-us",
                 "--omniserve-cpu-job-timeout"):
        assert flag in out


def test_mla_model_is_refused_before_loading(model_path, tmp_path):
    """A DeepSeek-V2 (MLA) config with no weights at all: refused from its config alone."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_path / f, tmp_path / f)
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 49152,
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "first_k_dense_replace": 2, "kv_lora_rank": 32, "q_lora_rank": None,
        "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32, "max_position_embeddings": 2048}))
    res = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path),
                          "--device", "cpu", "--omniserve"], capture_output=True, text=True, timeout=300,
                         check=False, env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "HF_HUB_OFFLINE": "1"})
    assert res.returncode != 0
    assert "does not support MLA models yet (DeepseekV2ForCausalLM)" in res.stderr + res.stdout
