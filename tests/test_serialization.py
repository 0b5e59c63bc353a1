"""Quantized base and adapter files: round trips, byte counts, fingerprints, bad files, no float materialisation."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tuneqdm
from tuneqdm import QuantConfig, TuneQDMError
from tuneqdm.serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS, QUANT_MAP, QUANT_WEIGHTS

from tiny_models import perturb_scales, tiny_unet


def _inputs(batch=2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([100, 800][:batch]), torch.randn(batch, 5, 32, generator=g)


@pytest.fixture
def qunet():
    return tuneqdm.quantize_(tiny_unet(), QuantConfig(bits=4, method="tuneqdm", experts=4, init="mse"))


def test_quantized_base_roundtrip(qunet, tmp_path):
    tuneqdm.save_quantized(qunet, tmp_path / "base", base_id="tiny-unet")
    loaded = tuneqdm.load_quantized(tmp_path / "base")
    assert type(loaded) is type(qunet)
    assert tuneqdm.fingerprint(loaded) == tuneqdm.fingerprint(qunet)
    x, t, emb = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, emb).sample, qunet(x, t, emb).sample, rtol=0, atol=0)
    # the file holds packed integers: its weights take bits/8 bytes per parameter (+ per-channel metadata)
    bytes_, numel = tuneqdm.weight_bytes(loaded)
    layers = tuneqdm.quantized_layers(loaded).values()
    assert bytes_ == sum((l.weight_shape.numel() + 1) // 2 + 5 * l.weight_shape[0] for l in layers)
    meta = json.loads((tmp_path / "base" / QUANT_MAP).read_text())
    assert meta["base_id"] == "tiny-unet" and meta["quant_config"]["bits"] == 4
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary folder left behind


def test_adapter_holds_only_scales(qunet, tmp_path):
    perturb_scales(qunet)
    tuneqdm.save_quantized(qunet, tmp_path / "base")
    tuneqdm.save_adapter(qunet, tmp_path / "adapter", extra={"prompts": ["a sks dog"]})
    n_scales = sum(p.numel() for p in tuneqdm.scale_parameters(qunet))
    size = (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    assert n_scales * 4 <= size < n_scales * 4 + 64 * 1024
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert cfg["method"] == "tuneqdm" and cfg["experts"] == 4 and cfg["num_train_timesteps"] == 1000
    assert cfg["base_fingerprint"] == tuneqdm.fingerprint(qunet) and cfg["prompts"] == ["a sks dog"]

    base = tuneqdm.load_quantized(tmp_path / "base")
    tuneqdm.configure_(base, method="peqa", experts=1)  # load_adapter switches back to the adapter's method
    tuneqdm.load_adapter(base, tmp_path / "adapter")
    x, t, emb = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(base(x, t, emb).sample, qunet(x, t, emb).sample, rtol=0, atol=0)


def test_adapter_on_another_base_names_both_fingerprints(qunet, tmp_path):
    tuneqdm.save_adapter(qunet, tmp_path / "adapter")
    other = tuneqdm.quantize_(tiny_unet(seed=1), QuantConfig(bits=4, init="mse"))
    with pytest.raises(TuneQDMError) as e:
        tuneqdm.load_adapter(other, tmp_path / "adapter")
    msg = str(e.value)
    assert tuneqdm.fingerprint(qunet) in msg and tuneqdm.fingerprint(other) in msg and "\n" not in msg
    w8 = tuneqdm.quantize_(tiny_unet(), QuantConfig(bits=8, init="mse"))
    with pytest.raises(TuneQDMError, match="was trained on a W4 mse base; this model is W8 mse"):
        tuneqdm.load_adapter(w8, tmp_path / "adapter")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_files_give_one_line_errors(qunet, tmp_path, damage):
    tuneqdm.save_quantized(qunet, tmp_path / "base")
    tuneqdm.save_adapter(qunet, tmp_path / "adapter")
    for path in (tmp_path / "base" / QUANT_WEIGHTS, tmp_path / "adapter" / ADAPTER_WEIGHTS):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00\x01garbage" * 10)
    with pytest.raises(TuneQDMError, match=r"quantized.safetensors is corrupt or truncated \(.*\): save the quantized base again"):
        tuneqdm.load_quantized(tmp_path / "base")
    with pytest.raises(TuneQDMError, match=r"adapter.safetensors is corrupt or truncated \(.*\): save the adapter again"):
        tuneqdm.load_adapter(qunet, tmp_path / "adapter")


def test_missing_and_mismatched_files(qunet, tmp_path):
    with pytest.raises(TuneQDMError, match="no quantized base at .*: quantization.json is missing"):
        tuneqdm.load_quantized(tmp_path)
    tuneqdm.save_quantized(qunet, tmp_path / "base")
    meta = json.loads((tmp_path / "base" / QUANT_MAP).read_text())
    meta["fingerprint"] = "0" * 16
    (tmp_path / "base" / QUANT_MAP).write_text(json.dumps(meta))
    with pytest.raises(TuneQDMError, match="quantization.json was changed after saving"):  # caught by the digest
        tuneqdm.load_quantized(tmp_path / "base")
    del meta["digests"]  # a file from before digests: the fingerprint still catches it
    (tmp_path / "base" / QUANT_MAP).write_text(json.dumps(meta))
    with pytest.raises(TuneQDMError, match="weights have fingerprint .* but quantization.json says 0000000000000000"):
        tuneqdm.load_quantized(tmp_path / "base")
    meta["format_version"] = 0
    (tmp_path / "base" / QUANT_MAP).write_text(json.dumps(meta))
    with pytest.raises(TuneQDMError, match="has format version 0; this tuneqdm reads version 1"):
        tuneqdm.load_quantized(tmp_path / "base")


def test_adapter_shapes_must_match_its_config(qunet, tmp_path):
    tuneqdm.save_adapter(qunet, tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["experts"] = 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(TuneQDMError, match=r"adapter_config.json was changed after saving"):  # caught by the digest
        tuneqdm.load_adapter(qunet, tmp_path / "adapter")
    del cfg["digests"]  # a file from before digests: the tensors' shapes still catch it
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(TuneQDMError, match=r"has shape \(4, \d+\), its config implies one row per expert \(2\)"):
        tuneqdm.load_adapter(qunet, tmp_path / "adapter")


@pytest.mark.parametrize("expert", [0, 3])
def test_export_float_weights_of_one_expert(qunet, expert):
    perturb_scales(qunet)
    x, _, emb = _inputs(1)
    t = torch.tensor([expert * 250 + 10])
    with torch.no_grad():
        want = qunet(x, t, emb).sample
        tuneqdm.dequantize_(qunet, expert=expert)
        got = qunet(x, t, emb).sample
    assert not tuneqdm.quantized_layers(qunet)
    assert all(p.dtype == torch.float32 for p in qunet.parameters())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_loading_never_materialises_float_weights(tmp_path):
    """Peak RSS of load_quantized stays far below the float model's size (W4: 1/8 of it)."""
    unet = tiny_unet(block_out_channels=(320, 640), cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
    float_bytes = sum(p.numel() * 4 for p in unet.parameters())
    tuneqdm.quantize_(unet, QuantConfig(bits=4, method="peqa", init="minmax"))
    tuneqdm.save_quantized(unet, tmp_path / "base")
    quant_bytes = (tmp_path / "base" / QUANT_WEIGHTS).stat().st_size
    script = textwrap.dedent(f"""
        import resource, tuneqdm, diffusers, torch
        diffusers.UNet2DConditionModel  # import the model code (and PEFT, which diffusers pulls in) before measuring
        def rss():
            return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024
        open('/proc/self/clear_refs', 'w').write('5')
        before = rss()
        m = tuneqdm.load_quantized({str(tmp_path / 'base')!r})
        peak = int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024
        print(peak - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    delta = int(out.split()[-1])
    assert float_bytes > 6 * quant_bytes
    assert delta < 2.5 * quant_bytes + 64 * 2**20, (delta, quant_bytes, float_bytes)


def test_plain_module_roundtrip_needs_its_skeleton(tmp_path):
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))

    m = tuneqdm.quantize_(build(), QuantConfig(bits=2, method="peqa", init="mse"))
    tuneqdm.save_quantized(m, tmp_path / "base")
    with pytest.raises(TuneQDMError, match=r"holds a torch.nn.modules.container.Sequential: pass an empty instance"):
        tuneqdm.load_quantized(tmp_path / "base")
    with torch.device("meta"):
        skeleton = build()
    loaded = tuneqdm.load_quantized(tmp_path / "base", model=skeleton)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)


def test_package_never_unpickles():
    from pathlib import Path

    source = "".join(p.read_text() for p in Path(tuneqdm.__file__).parent.rglob("*.py"))
    assert "torch.load(" not in source and "import pickle" not in source
