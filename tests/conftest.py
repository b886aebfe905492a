import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from vcu128.export import pipeline  # noqa: E402
from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint  # noqa: E402

# Qwen2.5-0.5B's widths where they matter: hidden 896 is 7 groups (an odd count, one partial chunk),
# intermediate 2432 is 19 groups (a full chunk and a partial one); kv dim 128; vocab 1056 = 33 * 32.
SMALL_QWEN = dict(hidden=896, intermediate=2432, num_layers=2, num_heads=14, num_kv_heads=2, vocab=1056)


# Fixtures that train or quantize the tiny model (minutes on one core): the tests that use them are
# marked `trained_model`, which bench/mutation.py leaves out (-m "not trained_model"): every mutant
# would train the model again in its own forked pytest.
TRAINED_MODEL_FIXTURES = {"tiny_model", "quantized"}


def pytest_configure(config):
    config.addinivalue_line("markers", "trained_model: uses the trained tiny model (a fixture of minutes); left out of mutation runs")


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINED_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.trained_model)


def export_all(qdir: Path, ports: int = 32, parts: int = 16, lm_method=None, fp16_rescale="auto") -> dict:
    return pipeline.export_all(qdir, lm_method, ports, parts, progress=False, fp16_rescale=fp16_rescale)


@pytest.fixture(scope="session")
def qwen_export(tmp_path_factory):
    """A small Qwen2-shaped checkpoint (q/k/v bias, untied lm_head), exported once for many tests."""
    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("qwen") / "q", SyntheticSpec(**SMALL_QWEN, seed=1))
    return export_all(qdir, lm_method="trunc")


@pytest.fixture
def make_checkpoint(tmp_path):
    def make(name="q", **overrides):
        spec = SyntheticSpec(**{**dict(hidden=256, intermediate=384, num_layers=2, num_heads=4, num_kv_heads=2, vocab=256), **overrides})
        return write_gptq_checkpoint(tmp_path / name, spec)

    return make


FAST = dict(nsamples=32, seqlen=128, calib=str(ROOT / "data" / "demo_corpus.txt"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny Qwen2 trained for a few seconds on the demo corpus (weights with real structure)."""
    from vcu128.demo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", train_steps=200)


@pytest.fixture(scope="session")
def tiny_untrained_model(tmp_path_factory):
    """The tiny Qwen2 at its seeded initialisation (no training: a second), for tests of what the steps
    do with their options and records rather than of quantization quality."""
    from vcu128.demo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "untrained", train_steps=0, progress=False)


@pytest.fixture(scope="session")
def quantized(tiny_model):
    """(checkpoint folder, report) of GPTQModel on the tiny model, on the CPU."""
    from vcu128.quant.quantize import QuantizeOptions, quantize_model

    return quantize_model(tiny_model, None, QuantizeOptions(**FAST))


def plant_overflow(model_dir: Path, out: Path, residual: float = 1.0, mlp: float = 1.0, mlp_layer: int = 1) -> Path:
    """A copy of a tiny fp16 model whose residual stream is carried `residual` times larger (embedding,
    o_proj and down_proj scaled: RMSNorm cancels it, so fp32 answers do not change) and whose layer
    `mlp_layer` MLP intermediate is `mlp` times larger (up_proj up, down_proj down): activations that
    pass fp16's 65504 the way a bf16-trained model's massive activations do."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(model_dir, out)
    path = out / "model.safetensors"
    t = {k: v.astype(np.float32) for k, v in load_file(path).items()}
    t["model.embed_tokens.weight"] *= residual
    for name in t:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            t[name] *= residual
    t[f"model.layers.{mlp_layer}.mlp.up_proj.weight"] *= mlp
    t[f"model.layers.{mlp_layer}.mlp.down_proj.weight"] /= mlp
    save_file({k: v.astype(np.float16) for k, v in t.items()}, path, metadata={"format": "pt"})
    return out


def rewrite_manifest(hw: Path) -> None:
    """Make a packed folder's manifest.json agree with its files as they are now (sizes and sha256):
    what an exporter bug would leave, so that only the bytes themselves can show a difference."""
    import hashlib
    import json

    doc = json.loads((hw / "manifest.json").read_text())
    for f in doc["files"]:
        data = (hw / f["path"]).read_bytes()
        f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (hw / "manifest.json").write_text(json.dumps(doc))
