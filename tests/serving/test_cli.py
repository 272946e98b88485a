"""SGLang's own launcher with the package installed lists the flags (the plugin's hooks are applied
in a real launcher process; what the flags do is tested in tests/unit/test_glue.py)."""

from __future__ import annotations

import subprocess
import sys


def test_flags_show_in_help():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    for flag in ("--omniserve", "--omniserve-cpu-kv-gb", "--omniserve-cpu-threads", "--omniserve-cpu-cores",
                 "--omniserve-cpu-attention", "--omniserve-cpu-page-size", "--omniserve-cpu-spin-us",
                 "--omniserve-cpu-job-timeout", "--omniserve-profile", "--omniserve-ttft-slo", "--omniserve-tpot-slo",
                 "--omniserve-ls-admission", "--omniserve-be-placement", "--omniserve-disable-control"):
        assert flag in out

