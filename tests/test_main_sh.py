"""The README's first command: `bash main.sh` as shipped runs the demo through every step."""

import os
import subprocess

from conftest import ROOT


def test_main_sh_demo_runs_every_step():
    env = {**os.environ, "TQDM_DISABLE": "1"}
    r = subprocess.run(["bash", str(ROOT / "main.sh")], capture_output=True, text=True, env=env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    summary = out[out.index("main.sh: done") :]
    for step in ("quantize", "compile_sw", "lm_head", "hardware", "embedding_tokens", "verify"):
        assert f" {step} " in summary, summary
    assert "packed folder: demo/tiny-qwen2-W4A16-gptq/compile/QWEN_BLOCK_write_data_port32" in summary
    assert "verify: OK: 518 files" in out  # 516 of section 3 and the two tables of section 5
    assert (ROOT / "log" / "tiny-qwen2.log").read_text().count("==> [tiny-qwen2]") == 6
