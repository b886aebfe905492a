"""A seeded, bounded fuzz test of the whole export: damage a tiny checkpoint's headers, offsets,
dtypes, shapes, data, index and configs, or one of the JSON records the steps write and read
(compile_sw.json, lm_head.json, quant_report.json, activation_stats.json, quantize_config.json, the
rescale record of compile/config.json), run every step, and require that each run either exports
a folder verify.py passes, or stops with exit 2 and one `error:` line (no traceback), leaving nothing
beside its target and the earlier outputs as they were. Every path the steps see has glob
characters and a space in it and reaches the checkpoint through a symlinked folder."""

import contextlib
import hashlib
import importlib.util
import io
import json
import shutil
import struct

import pytest
from conftest import ROOT, export_all
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vcu128.format.synthetic import SyntheticSpec, write_gptq_checkpoint
from vcu128.io.errors import run_cli

STEPS = ["compile_sw", "lm_head", "hardware", "embedding_tokens", "verify"]
HW = "compile/QWEN_BLOCK_write_data_port32"


def cli(name):
    spec = importlib.util.spec_from_file_location(f"cli_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


MAINS = {name: cli(name) for name in STEPS}


def step_args(name, qdir, fit=False):
    comp = qdir / "compile"
    return {
        "compile_sw": ["--quantize_model", str(qdir)],
        "lm_head": ["--quantize_model", str(qdir)],
        "hardware": ["--compile_dir", str(comp)] + (["--silu_table", "fit"] if fit else []),
        "embedding_tokens": ["--compile_dir", str(comp)],
        "verify": ["--quantize_model", str(qdir), "--hardware_dir", str(qdir / HW), "--bits_only"],
    }[name]


def step_target(name, qdir):
    return {"compile_sw": qdir / "compile", "lm_head": qdir / "compile/qwen2_qweight_bin", "hardware": qdir / HW,
            "embedding_tokens": qdir / HW / "Embedding", "verify": qdir / "compile/verify_report.json"}[name]


def digest(path):
    """A digest of every file under path (or of the file), by relative name."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    sha = hashlib.sha256()
    for f in files:
        sha.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return sha.hexdigest()


@pytest.fixture(scope="module")
def exported_base(tmp_path_factory):
    """A tiny checkpoint (one layer, head_dim 64, vocab 64) with a good export in place: its
    quant_report.json holds statistics (compile_sw copies them to compile/activation_stats.json)
    and the compile folder carries an fp16 rescaling record."""
    spec = SyntheticSpec(hidden=128, intermediate=256, num_layers=1, num_heads=2, num_kv_heads=1, vocab=64, seed=5)
    qdir = write_gptq_checkpoint(tmp_path_factory.mktemp("fuzzbase") / "q", spec)
    stats = {"measured_on": "fuzz", "dtype": "float32", "layers": [{"layer": 0, "max_abs": {"q": 2.0, "gate": 6.0, "residual_mlp": 9.0}}],
             "gate_range": [-6.0, 5.0]}
    files = sorted(p.name for p in qdir.iterdir()) + ["quant_report.json"]
    (qdir / "quant_report.json").write_text(json.dumps({"tool": "compiler-vcu128", "step": "quantize", "files": files, "activation_stats": stats}))
    export_all(qdir, fp16_rescale="k=1,m=1")
    return qdir


def fuzz_copy(exported_base, tmp_path_factory):
    """A copy of the base in a folder named with glob characters and a space, and the path the steps
    are given to it: through a symlinked parent."""
    work = tmp_path_factory.mktemp("fuzz") / "w [v2]*?"
    shutil.copytree(exported_base, work / "q")
    link = work.parent / "link"
    link.symlink_to(work)
    return work, work / "q", link / "q"


SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 1 << 33), st.floats(allow_nan=True), st.text(max_size=4),
                        st.lists(st.integers(0, 9), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def header_of(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def put_header(raw, n, header):
    new = json.dumps(header).encode()
    return struct.pack("<Q", len(new)) + new + raw[8 + n :]


RECORDS = ["compile/compile_sw.json", "compile/lm_head.json", "quant_report.json", "compile/activation_stats.json", "quantize_config.json",
           "compile/config.json"]


@st.composite
def record_damage(draw):
    """One damage to a JSON record: a value somewhere in it replaced or removed, or the file replaced."""
    record = draw(st.sampled_from(RECORDS))
    picks = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=5))
    value = draw(JSON_VALUES)
    how = draw(st.sampled_from(["set", "set", "set", "delete", "file"]))
    junk = draw(st.sampled_from(["", "{", "[]", "null", "\"x\"", "{\"tool\": 1}", "\xff\xfe"]))

    def apply(qdir):
        path = qdir / record
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if how == "file":
            path.write_bytes(junk.encode("latin-1"))
            return
        if record == "compile/config.json":  # the record there is the rescale key
            doc.setdefault("vcu128_fp16_rescale", {"k": 1, "m": [1]})
            node, key = doc, "vcu128_fp16_rescale"
        else:
            node, key = None, None
        for pick in picks:  # walk down: each pick chooses a key or index of the node reached
            here = doc if node is None else node[key]
            if isinstance(here, dict) and here:
                node, key = here, sorted(here)[pick % len(here)]
            elif isinstance(here, list) and here:
                node, key = here, pick % len(here)
            else:
                break
        if node is None:
            return
        if how == "delete":
            del node[key]
        else:
            node[key] = value
        path.write_text(json.dumps(doc))

    return f"record:{record}:{how}", apply


@st.composite
def damage(draw):
    """One damage to a checkpoint folder, as a function of the folder."""
    if draw(st.integers(0, 4)) == 0:
        return draw(record_damage())
    kind = draw(st.sampled_from(["header_length", "offsets", "dtype", "shape", "truncate", "data_byte", "index", "config", "quant_config"]))
    shard = draw(st.sampled_from(SHARDS))
    pick = draw(st.integers(0, 10**6))
    value = draw(JSON_VALUES)
    number = draw(st.integers(0, 1 << 41))

    def apply(qdir):
        path = qdir / shard
        raw = path.read_bytes()
        try:
            n, header = header_of(raw)
            names = sorted(k for k in header if k != "__metadata__")
            name = names[pick % len(names)]
        except (ValueError, TypeError, AttributeError, struct.error, ZeroDivisionError):  # damaged by an earlier damage
            return
        if kind == "header_length":
            path.write_bytes(struct.pack("<Q", number) + raw[8:])
        elif kind == "offsets":
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [[end, begin], [begin, end + 8], [0, end - begin], [begin + 4, end + 4], value][pick % 5]
            path.write_bytes(put_header(raw, n, header))
        elif kind == "dtype":
            header[name]["dtype"] = ["F32", "I32", "BF16", "U8", "I64", "Q4", value][pick % 7]
            path.write_bytes(put_header(raw, n, header))
        elif kind == "shape":
            shape = header[name]["shape"]
            header[name]["shape"] = [shape[::-1], shape[:-1], [*shape, 1], [0, *shape[1:]], value][pick % 5]
            path.write_bytes(put_header(raw, n, header))
        elif kind == "truncate":
            path.write_bytes(raw[: number % len(raw)])
        elif kind == "data_byte":
            data = bytearray(raw)
            data[8 + n + number % (len(raw) - 8 - n)] ^= 1 << pick % 8
            path.write_bytes(bytes(data))
        elif kind == "index":
            index = qdir / "model.safetensors.index.json"
            try:
                doc = json.loads(index.read_text())
                doc["weight_map"][name]
            except (ValueError, KeyError, TypeError):
                return
            choice = pick % 4
            if choice == 0:
                doc["weight_map"][name] = ["/etc/passwd", "../x.safetensors", SHARDS[0], ""][number % 4]
            elif choice == 1:
                doc["weight_map"] = value
            elif choice == 2:
                doc["weight_map"].pop(name)
            index.write_text(json.dumps(doc) if choice < 3 else "{\"weight_map\": ")
        else:
            path = qdir / ("config.json" if kind == "config" else "quantize_config.json")
            try:
                doc = json.loads(path.read_text())
                assert isinstance(doc, dict)
            except (ValueError, AssertionError):
                return
            keys = (["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "vocab_size", "tie_word_embeddings", "model_type", "hidden_act", "quantization_config"] if kind == "config"
                    else ["bits", "group_size", "sym", "desc_act", "checkpoint_format", "quant_method", "dynamic"])
            doc[keys[pick % len(keys)]] = value
            path.write_text(json.dumps(doc) if number % 7 else json.dumps([doc]))

    return kind, apply


def run_step(name, qdir, fit=False):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_cli(MAINS[name], step_args(name, qdir, fit))
    return code, err.getvalue()


def check_run(work, name, target, before, code, err, kinds):
    """A step's run ended as promised: exit 0, or exit 2 with one error line and its target as it was."""
    assert "Traceback" not in err, (kinds, name, err)
    assert code in (0, 2), (kinds, name, code, err)
    leftovers = [str(p) for p in work.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]
    assert not leftovers, (kinds, name, leftovers)
    if code == 2:
        lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
        assert lines[0].startswith("error: ") and len(lines) <= 2, (kinds, name, err)
        assert all(line.startswith("hint: ") for line in lines[1:]), (kinds, name, err)
        assert digest(target) == before, (kinds, name, "a refused step changed its earlier output")


@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damages=st.lists(damage(), min_size=1, max_size=2))
def test_fuzzed_checkpoints_export_correctly_or_are_refused_cleanly(exported_base, tmp_path_factory, damages):
    work, qdir, seen = fuzz_copy(exported_base, tmp_path_factory)
    for _, apply in damages:
        apply(qdir)
    kinds = [k for k, _ in damages]
    for name in STEPS:
        target = step_target(name, qdir)
        before = digest(target)
        code, err = run_step(name, seen)
        check_run(work, name, target, before, code, err, kinds)
        if code == 2:
            return
    # every step ran: verify passed the folder (exit 0, checked above)


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damage=record_damage(), start=st.integers(0, len(STEPS) - 1), fit=st.booleans())
def test_fuzzed_records_are_read_strictly(exported_base, tmp_path_factory, damage, start, fit):
    """A damaged record reaches the step that reads it first (the steps before it are not re-run)."""
    work, qdir, seen = fuzz_copy(exported_base, tmp_path_factory)
    kind, apply = damage
    apply(qdir)
    inputs = digest(qdir / "model-00001-of-00002.safetensors")
    for name in STEPS[start:]:
        target = step_target(name, qdir)
        before = digest(target)
        code, err = run_step(name, seen, fit)
        check_run(work, name, target, before, code, err, [kind])
        if code == 2:
            event(f"refused by {name}")
            break
    else:
        event("every step ran")
    assert digest(qdir / "model-00001-of-00002.safetensors") == inputs  # an input is never written
