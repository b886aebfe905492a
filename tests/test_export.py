"""The four export steps end to end on synthetic checkpoints, every output checked against the
checkpoint: software files by an independent decode, hardware words by the literal reference."""

import hashlib
import json
import math

import numpy as np
import pytest
import reference as ref
from conftest import export_all
from safetensors import safe_open

from vcu128.format.gate import read_model_dims
from vcu128.format.model import LINEARS


class Ckpt:
    """Read tensors straight from the shards (no vcu128 code)."""

    def __init__(self, qdir):
        self.qdir = qdir
        index = qdir / "model.safetensors.index.json"
        if index.is_file():
            self.map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(qdir / "model.safetensors", "pt") as f:
                self.map = {k: "model.safetensors" for k in f.keys()}

    def has(self, name):
        return name in self.map

    def __getitem__(self, name):
        with safe_open(self.qdir / self.map[name], "pt") as f:
            t = f.get_tensor(name)
        return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()


def gptq_signed(qweight):
    """[chout, chin] signed ints from qweight [chin/8, chout], by shifts (not the code's table)."""
    shifts = np.arange(8, dtype=np.uint32) * 4
    nib = (qweight.view(np.uint32)[:, None, :] >> shifts[None, :, None]) & 0xF  # [chin/8, 8, chout]
    return nib.reshape(-1, qweight.shape[1]).T.astype(np.int32) - 8


def sw(compile_dir, name, dtype, shape):
    """A software-format file: norms and the embedding in qwen2_fp16_weight_bin, the rest in qwen2_qweight_bin."""
    fp16 = name.endswith((".weight.bin"))
    path = compile_dir / ("qwen2_fp16_weight_bin" if fp16 else "qwen2_qweight_bin") / name
    data = np.fromfile(path, dtype)
    assert data.size == math.prod(shape), path
    return data.reshape(shape)


def check_software(exp, bias_modules):
    qdir, comp = exp["qdir"], exp["compile"]
    ck, d = Ckpt(qdir), read_model_dims(qdir / "config.json")
    assert json.loads((comp / "config.json").read_text()) == json.loads((qdir / "config.json").read_text())
    for layer in range(d.num_layers):
        for lin in LINEARS:
            name = lin.name(layer)
            chin, chout = d.linear_shape(lin)
            q = sw(comp, f"{name}.qweight.bin", "<i4", (chout, chin))
            assert np.array_equal(q, gptq_signed(ck[f"{name}.qweight"])), name
            assert q[0, :8].tolist() == [ref.gptq_int(ck[f"{name}.qweight"], r, 0) - 8 for r in range(8)]
            s = sw(comp, f"{name}.scales.bin", "<f2", (chout, chin // 128))
            assert np.array_equal(s.view(np.uint16), ck[f"{name}.scales"].T.view(np.uint16)), name
            b = sw(comp, f"{name}.bias.bin", "<f2", (chout,))
            want = ck[f"{name}.bias"].astype(np.float16) if lin.module in bias_modules else np.zeros(chout, np.float16)
            assert np.array_equal(b.view(np.uint16), want.view(np.uint16)), name
        for norm in ("input_layernorm", "post_attention_layernorm"):
            n = sw(comp, f"model.layers.{layer}.{norm}.weight.bin", "<f2", (2 * d.hidden,))
            assert np.array_equal(n[: d.hidden], ck[f"model.layers.{layer}.{norm}.weight"].astype(np.float16))
            assert not n[d.hidden :].view(np.uint16).any()
    n = sw(comp, "model.norm.weight.bin", "<f2", (2 * d.hidden,))
    assert np.array_equal(n[: d.hidden], ck["model.norm.weight"].astype(np.float16)) and not n[d.hidden :].any()
    e = sw(comp, "model.embed_tokens.weight.bin", "<f2", (d.vocab, d.hidden))
    assert np.array_equal(e, ck["model.embed_tokens.weight"].astype(np.float16))


def read_ports(hw, stem, chout, chin, ports):
    """Every row (padding rows included) by the literal port rule."""
    words = 8 * math.ceil(chin / 2048) + chin // 8
    per_port = math.ceil(chout / ports)
    files = [np.fromfile(hw / f"{stem}_HBM_DDR_{p:02d}.bin", "<u4") for p in range(ports)]
    assert all(f.size == per_port * words for f in files), stem
    rows = np.empty((per_port * ports, words), np.uint32)
    for r in range(per_port * ports):
        p, pos = ref.port_of_row(r, ports)
        rows[r] = files[p][pos * words : (pos + 1) * words]
    return rows


def check_linear(hw, stem, bias_file, q, scales, bias, ports, sample_rows=4):
    chout, chin = q.shape
    rows = read_ports(hw, stem, chout, chin, ports)
    assert not rows[chout:].any(), f"{stem}: padding rows must be zero"
    rng = np.random.default_rng(0)
    for r in sorted({0, chout - 1, *rng.integers(0, chout, sample_rows).tolist()}):
        assert rows[r].tolist() == ref.packed_row(q[r], scales[r]), (stem, r)
    # Every other row by a vectorised rule: the weight words hold q's nibbles, in order.
    shifts = np.arange(8, dtype=np.uint32) * 4
    for i in range(math.ceil(chin / 2048)):
        base = i * (8 + 256)
        n = min(256, chin // 8 - 256 * i)
        ww = rows[:chout, base + 8 : base + 8 + n]
        nib = ((ww[:, :, None] >> shifts) & 0xF).astype(np.int32).reshape(chout, -1)
        assert np.array_equal(np.where(nib >= 8, nib - 16, nib), q[:, 2048 * i : 2048 * i + 8 * n]), (stem, i)
    bias_words = np.fromfile(hw / bias_file, "<u4")
    assert bias_words.tolist() == [ref.bias_word(b) for b in bias], bias_file


def check_hardware(exp, ports=32):
    comp, hw = exp["compile"], exp["hw"]
    d = read_model_dims(comp / "config.json")
    for layer in range(d.num_layers):
        block = f"BLOCK{layer:02d}"
        for lin in LINEARS:
            name = lin.name(layer)
            chin, chout = d.linear_shape(lin)
            q = sw(comp, f"{name}.qweight.bin", "<i4", (chout, chin))
            s = sw(comp, f"{name}.scales.bin", "<f2", (chout, chin // 128))
            b = sw(comp, f"{name}.bias.bin", "<f2", (chout,))
            check_linear(
                hw,
                f"{block}/{lin.unit}_write_to_HBM_bin/{lin.stem}",
                f"{block}/{lin.unit}_DDR_bin/{lin.stem}_wt_and_bias_in_DDR.bin",
                q, s, b, ports,
            )
        for norm, board in (("input_layernorm", "LN0"), ("post_attention_layernorm", "LN1")):
            src = comp / "qwen2_fp16_weight_bin" / f"model.layers.{layer}.{norm}.weight.bin"
            assert (hw / block / "LN_DDR_bin" / f"{board}_wt_in_DDR.bin").read_bytes() == src.read_bytes()
    q = sw(comp, "lm_head_qweight.bin", "<i4", (d.vocab, d.hidden))
    s = sw(comp, "lm_head_scales.bin", "<f2", (d.vocab, d.hidden // 128))
    check_linear(
        hw, "OutLayer/MVM_BN_write_to_HBM_bin/MVMBN_Argmax", "OutLayer/MVM_BN_DDR_bin/MVMBN_Argmax_wt_and_bias_in_DDR.bin",
        q, s, np.zeros(d.vocab, np.float16), ports,
    )
    assert set(np.fromfile(hw / "OutLayer/MVM_BN_DDR_bin/MVMBN_Argmax_wt_and_bias_in_DDR.bin", "<u4").tolist()) == {0x3C000000}
    assert (hw / "OutLayer/LN_DDR_bin/LN_wt_in_DDR.bin").read_bytes() == (comp / "qwen2_fp16_weight_bin/model.norm.weight.bin").read_bytes()


def check_embedding(exp, parts=16):
    comp, hw = exp["compile"], exp["hw"]
    d = read_model_dims(comp / "config.json")
    table = (comp / "qwen2_fp16_weight_bin/model.embed_tokens.weight.bin").read_bytes()
    part = len(table) // parts
    assert part == d.vocab // parts * d.hidden * 2
    for i in range(parts):
        assert (hw / "Embedding" / f"Embedding_{i + 1:02d}-of-{parts:02d}.bin").read_bytes() == table[i * part : (i + 1) * part]


def check_manifest(hw):
    doc = json.loads((hw / "manifest.json").read_text())
    listed = {f["path"]: f for f in doc["files"]}
    on_disk = {str(p.relative_to(hw)) for p in hw.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(listed) == on_disk
    for rel, f in listed.items():
        data = (hw / rel).read_bytes()
        assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest(), rel
    return doc


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def test_qwen2_export_is_exact(qwen_export):
    check_software(qwen_export, QKV)
    check_hardware(qwen_export)
    check_embedding(qwen_export)
    doc = check_manifest(qwen_export["hw"])
    assert doc["ports"] == 32 and doc["model"]["hidden"] == 896 and doc["embedding_parts"] == 16
    # 2 layers x 7 linears x (32 ports + bias) + 4 norms + OutLayer (32 + bias + norm) + 16 parts
    # + the SiLU table (head_dim 64: no RoPE table)
    assert len(doc["files"]) == 2 * 7 * 33 + 4 + 34 + 16 + 1


def test_qwen2_lm_head_trunc_matches_reference(qwen_export):
    comp = qwen_export["compile"]
    d = read_model_dims(comp / "config.json")
    w = Ckpt(qwen_export["qdir"])["lm_head.weight"]
    q = sw(comp, "lm_head_qweight.bin", "<i4", (d.vocab, d.hidden))
    s = sw(comp, "lm_head_scales.bin", "<f2", (d.vocab, d.hidden // 128))
    for r in (0, 17, d.vocab - 1):
        for g in range(d.hidden // 128):
            scale, ints = ref.trunc_group(w[r, 128 * g : 128 * (g + 1)])
            assert q[r, 128 * g : 128 * (g + 1)].tolist() == ints
            assert s[r, g].view(np.uint16) == np.float16(scale).view(np.uint16)


@pytest.mark.parametrize(
    "case, spec, bias_modules",
    [
        ("llama, no bias, tied, 16 ports", dict(model_type="llama", biased=(), tie_word_embeddings=True), ()),
        ("zero bias on every linear, gptq_v2, bf16", dict(biased=tuple(lin.module for lin in LINEARS), checkpoint_format="gptq_v2", float_dtype="bfloat16"), "all"),
        ("fp32 floats, lm_head quantized in the checkpoint", dict(float_dtype="float32", lm_head_quantized=True), QKV),
    ],
)
def test_variants_export_exactly(make_checkpoint, case, spec, bias_modules):
    qdir = make_checkpoint(**spec)
    ports = 16 if "16 ports" in case else 32
    exp = export_all(qdir, ports=ports)
    check_software(exp, tuple(lin.module for lin in LINEARS) if bias_modules == "all" else bias_modules)
    check_hardware(exp, ports)
    check_embedding(exp)
    check_manifest(exp["hw"])
    comp, d = exp["compile"], read_model_dims(qdir / "config.json")
    q = sw(comp, "lm_head_qweight.bin", "<i4", (d.vocab, d.hidden))
    ck = Ckpt(qdir)
    if spec.get("lm_head_quantized"):
        assert np.array_equal(q, gptq_signed(ck["lm_head.qweight"]))
    elif spec.get("tie_word_embeddings"):
        # rtn of the embedding table: every int is the nearest level, clamped
        w = ck["model.embed_tokens.weight"].astype(np.float32)
        s = sw(comp, "lm_head_scales.bin", "<f2", (d.vocab, d.hidden // 128)).astype(np.float32)
        err = np.linalg.norm(w - (q.reshape(d.vocab, -1, 128) * s[..., None]).reshape(w.shape)) / np.linalg.norm(w)
        assert 0.03 < err < 0.13


def test_seven_b_row_widths_pack_exactly(tmp_path):
    """Qwen2-7B's real chin values, few rows: 3584 (q, k, v, o, gate, up, lm_head) and 18944 (down)."""
    from vcu128.export.packing import PackJob
    from vcu128.format.layout import BinFile

    rng = np.random.default_rng(7)
    for chin, chout in ((3584, 40), (18944, 33), (3584, 512)):
        q = rng.integers(-8, 8, (chout, chin)).astype("<i4")
        s = rng.uniform(0.001, 0.05, (chout, chin // 128)).astype("<f2")
        b = rng.normal(0, 1, chout).astype("<f2")
        d = tmp_path / f"{chin}x{chout}"
        d.mkdir()
        q.tofile(d / "q.bin"), s.tofile(d / "s.bin"), b.tofile(d / "b.bin")
        job = PackJob(
            "x", BinFile(d / "q.bin", "<i4", q.shape), BinFile(d / "s.bin", "<f2", s.shape),
            BinFile(d / "b.bin", "<f2", b.shape), "out/X", "out/X_bias.bin",
        )
        records = job.run(d, 32)
        assert len(records) == 33
        check_linear(d, "out/X", "out/X_bias.bin", q, s, b, 32, sample_rows=2)


def test_rerun_replaces_its_own_files_keeps_others_and_leaves_no_staging(qwen_export, tmp_path):
    from vcu128.export.hardware import pack_hardware

    out = tmp_path / "hw"
    pack_hardware(qwen_export["compile"], out, 32, progress=False)
    packed = out / "BLOCK00/LN_DDR_bin/LN0_wt_in_DDR.bin"
    good = packed.read_bytes()
    packed.write_bytes(b"damaged")
    (out / "notes.txt").write_bytes(b"a user's file")
    pack_hardware(qwen_export["compile"], out, 32, progress=False)
    assert packed.read_bytes() == good
    assert (out / "notes.txt").read_bytes() == b"a user's file"
    assert [p.name for p in tmp_path.iterdir()] == ["hw"]


def test_single_file_checkpoint_exports_like_the_sharded_one(make_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    sharded = make_checkpoint("sharded")
    single = tmp_path / "single"
    single.mkdir()
    tensors = {}
    for shard in sorted(sharded.glob("*.safetensors")):
        tensors.update(load_file(shard))
    save_file(tensors, single / "model.safetensors")
    for f in ("config.json", "quantize_config.json"):
        (single / f).write_bytes((sharded / f).read_bytes())
    a, b = export_all(sharded), export_all(single)
    for f in sorted(p.relative_to(a["hw"]) for p in a["hw"].rglob("*.bin")):
        assert (a["hw"] / f).read_bytes() == (b["hw"] / f).read_bytes(), f
