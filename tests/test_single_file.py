"""Single-file checkpoints (tuneqdm.loading.single_file): a ``model.safetensors`` in the original layout is read
through diffusers' own converters, run on lazy tensors, and every command takes it like a pipeline folder."""

import collections
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import tuneqdm
from tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline
from tuneqdm.cli import main
from tuneqdm.errors import TuneQDMError, TuneQDMWarning
from tuneqdm.export.single_file import unet_to_ldm
from tuneqdm.loading import quantized_denoiser, resolve
from tuneqdm.loading import single_file as sf
from tuneqdm.tuning import QuantConfig

CLIP_PREFIX = "cond_stage_model.transformer."
Usage = collections.namedtuple("Usage", "total used free")


def _clip_ldm(encoder, prefix=CLIP_PREFIX) -> dict:
    """A CLIP text encoder's tensors as SD 1.x single files name them."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v.contiguous()
            for k, v in encoder.state_dict().items()}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD pipeline folder and a single file of its UNet and text encoder (its VAE left to the folder)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("single")
    folder = tiny_sd_pipeline(root / "pipeline")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    save_file({**unet_to_ldm(unet), **_clip_ldm(encoder)}, root / "model.safetensors")
    return folder, root / "model.safetensors"


def _train(base, photos, out, *extra):
    return ["train", "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(photos),
            "--instance_prompt", "a sks dog", "--max_train_steps", "2", "--resolution", "32", "--output_dir", str(out),
            "--quiet", *extra]


def test_the_converted_components_hold_exactly_the_folders_tensors(sd):
    folder, file = sd
    source = resolve(file, single_file_config=str(folder))
    assert sorted(source.folders) == ["text_encoder", "unet"]  # the VAE is not in the file: the folder's own
    assert source.component_folder("vae") == folder / "vae" and source.base_id == str(file.resolve())
    for name in ("unet", "text_encoder"):
        (got_file,) = source.component_folder(name).glob("*.safetensors")
        (want_file,) = (folder / name).glob("*.safetensors")
        got, want = load_file(got_file), load_file(want_file)
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert source.fingerprint("unet") == resolve(folder).fingerprint("unet")


def test_weights_no_component_takes_are_named_with_where_the_rest_comes_from(sd, tmp_path, monkeypatch):
    folder, file = sd
    monkeypatch.setenv("TUNEQDM_CACHE", str(tmp_path / "cache"))
    save_file({**load_file(file), "extra.proj.weight": torch.zeros(2, 2), "extra.bias": torch.zeros(2)},
              tmp_path / "extra.safetensors")
    with pytest.warns(TuneQDMWarning, match="^extra.safetensors holds 1 weights no component took \\(e.g. "
                                                    f"extra.proj.weight\\); its vae comes from {folder}$"):
        resolve(tmp_path / "extra.safetensors", single_file_config=str(folder))


def test_train_and_generate_from_a_single_file_equal_the_folders(sd, photos, tmp_path):
    folder, file = sd
    assert main(_train(folder, photos, tmp_path / "folder")) == 0
    assert main(_train(file, photos, tmp_path / "file", "--single_file_config", str(folder))) == 0
    a, b = (load_file(tmp_path / run / "adapter.safetensors") for run in ("folder", "file"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for run in ("folder", "file"):  # the adapter knows its single file and the configs it was read with
        assert main(["generate", "--adapter", str(tmp_path / run), "--prompt", "a sks dog", "--num_images", "1",
                     "--num_inference_steps", "2", "--out", str(tmp_path / f"img-{run}"), "--quiet"]) == 0
    assert (tmp_path / "img-folder" / "000.png").read_bytes() == (tmp_path / "img-file" / "000.png").read_bytes()


def test_a_file_is_converted_once_in_shards_of_bounded_size(sd, tmp_path, monkeypatch):
    folder, file = sd
    monkeypatch.setenv("TUNEQDM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sf, "SHARD_BYTES", 64 * 1024)  # the tiny UNet's ~1.4 MB in many shards
    source = resolve(file, single_file_config=str(folder))
    unet = source.component_folder("unet")
    shards = sorted(unet.glob("*.safetensors"))
    assert len(shards) > 4  # each under the bound, or one tensor larger than it alone
    assert all(s.stat().st_size < 64 * 1024 + 16 * 1024 or len(load_file(s)) == 1 for s in shards)
    assert (unet / "diffusion_pytorch_model.safetensors.index.json").is_file()
    want = quantized_denoiser(resolve(folder), QuantConfig(bits=4, init="mse"), cache=False)
    got = quantized_denoiser(source, QuantConfig(bits=4, init="mse"), cache=False)
    assert tuneqdm.fingerprint(got) == tuneqdm.fingerprint(want)
    stamps = [s.stat().st_mtime_ns for s in shards]
    assert resolve(file, single_file_config=str(folder)).component_folder("unet") == unet  # read, not converted again
    assert [s.stat().st_mtime_ns for s in shards] == stamps


def test_sdxl_unet_only_file_and_fp8_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    folder = tiny_sdxl_pipeline(tmp_path / "sdxl")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in unet_to_ldm(unet).items()}
    save_file(fp8, tmp_path / "sdxl.safetensors")
    source = resolve(tmp_path / "sdxl.safetensors", single_file_config=str(folder))
    assert sorted(source.folders) == ["unet"]  # the encoders and the VAE: the folder's own
    (converted,) = source.component_folder("unet").glob("*.safetensors")
    assert {t.dtype for t in load_file(converted).values()} == {torch.float8_e4m3fn}  # stored as shipped
    want = tuneqdm.quantize_(unet.to(torch.float8_e4m3fn).float(), QuantConfig(bits=4, init="mse"))
    got = quantized_denoiser(source, QuantConfig(bits=4, init="mse"), cache=False)
    assert tuneqdm.fingerprint(got) == tuneqdm.fingerprint(want)


def test_the_lazy_tensors_replay_every_op_the_converters_use(tmp_path):
    torch.manual_seed(0)
    stored = {"qkv": torch.randn(12, 4), "mod": torch.randn(8), "conv": torch.randn(4, 4, 1, 1),
              "proj": torch.randn(4, 6), "fp8": torch.randn(6, 4).to(torch.float8_e4m3fn)}
    save_file(stored, tmp_path / "f.safetensors")
    lazy = sf.lazy_checkpoint(tmp_path / "f.safetensors")

    def ops(c):  # what diffusers' FLUX, VAE and OpenCLIP converters do to a checkpoint
        q, k, v = torch.chunk(c["qkv"], 3, dim=0)
        a, b = torch.split(c["proj"], (2, 4), dim=1)
        shift, scale = c["mod"].chunk(2, dim=0)
        return {"q": torch.cat([q]), "v": v, "kq": torch.cat([k, q], dim=0), "a": a.clone().detach(), "b": b,
                "swap": torch.cat([scale, shift], dim=0), "linear": c["conv"][:, :, 0, 0], "t": c["proj"].T.contiguous(),
                "slice": c["qkv"][4:8, :], "fp8": c["fp8"][:3]}

    want, traced = ops(stored), ops(lazy)
    assert all(t.is_meta for t in traced.values())  # nothing was read to work out the mapping
    make = sf._Materializer(tmp_path / "f.safetensors")
    for key, t in traced.items():
        assert tuple(t.shape) == tuple(want[key].shape) and t.dtype == want[key].dtype
        assert torch.equal(make(t).float(), want[key].float()), key


def test_flux_files_map_onto_every_tensor_of_the_transformer():
    """FLUX.1 files at FLUX.1's width (diffusers' converter assumes 3072), checked on the meta device: every tensor
    of the diffusers transformer is made, with its shape, from the original layout's."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    original = _flux_original_shapes(shapes)
    lazy = {k: sf.LazyTensor(torch.empty(s, device="meta", dtype=torch.bfloat16), ("file", k))
            for k, s in original.items()}
    converted = sf.convert_component("diffusers", "FluxTransformer2DModel", lazy, model, dict(model.config))
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes


def _flux_original_shapes(d: dict) -> dict:
    """The BFL layout's names and shapes for a diffusers FLUX transformer's (from the FLUX.1 reference code)."""
    o = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
         "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
         "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
         "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
         "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
         "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2", "txt_in": "context_embedder",
         "img_in": "x_embedder", "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
         "double_blocks.0.img_mod.lin": "transformer_blocks.0.norm1.linear",
         "double_blocks.0.txt_mod.lin": "transformer_blocks.0.norm1_context.linear",
         "double_blocks.0.img_mlp.0": "transformer_blocks.0.ff.net.0.proj",
         "double_blocks.0.img_mlp.2": "transformer_blocks.0.ff.net.2",
         "double_blocks.0.txt_mlp.0": "transformer_blocks.0.ff_context.net.0.proj",
         "double_blocks.0.txt_mlp.2": "transformer_blocks.0.ff_context.net.2",
         "double_blocks.0.img_attn.proj": "transformer_blocks.0.attn.to_out.0",
         "double_blocks.0.txt_attn.proj": "transformer_blocks.0.attn.to_add_out",
         "single_blocks.0.modulation.lin": "single_transformer_blocks.0.norm.linear",
         "single_blocks.0.linear2": "single_transformer_blocks.0.proj_out"}
    out = {f"{a}.{leaf}": d[f"{b}.{leaf}"] for a, b in o.items() for leaf in ("weight", "bias")}
    for side, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
        for leaf in ("weight", "bias"):
            rows = sum(d[f"transformer_blocks.0.attn.{n}.{leaf}"][0] for n in names)
            out[f"double_blocks.0.{side}_attn.qkv.{leaf}"] = (rows, *d[f"transformer_blocks.0.attn.to_q.{leaf}"][1:])
    for side, (q, k) in (("img", ("norm_q", "norm_k")), ("txt", ("norm_added_q", "norm_added_k"))):
        out[f"double_blocks.0.{side}_attn.norm.query_norm.scale"] = d[f"transformer_blocks.0.attn.{q}.weight"]
        out[f"double_blocks.0.{side}_attn.norm.key_norm.scale"] = d[f"transformer_blocks.0.attn.{k}.weight"]
    for leaf in ("weight", "bias"):
        parts = [d[f"single_transformer_blocks.0.{n}.{leaf}"] for n in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                         "proj_mlp")]
        out[f"single_blocks.0.linear1.{leaf}"] = (sum(p[0] for p in parts), *parts[0][1:])
    out["single_blocks.0.norm.query_norm.scale"] = d["single_transformer_blocks.0.attn.norm_q.weight"]
    out["single_blocks.0.norm.key_norm.scale"] = d["single_transformer_blocks.0.attn.norm_k.weight"]
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def test_without_a_config_the_inferred_repositorys_configs_come_from_the_hub_cache(sd, tmp_path):
    folder, file = sd
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (f"from tuneqdm.loading import resolve\ns = resolve({str(file)!r})\n"
            "print(s.folder, sorted(s.folders), s.component_folder('vae'))\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "TUNEQDM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    snapshot = repo / "snapshots" / commit
    assert out.split() == [str(snapshot), "['text_encoder',", "'unet']", str(snapshot / "vae")]


# ---- bad input: one line, nothing left behind --------------------------------------------------------------------
def test_bad_single_files_are_one_line_and_leave_nothing(sd, photos, tmp_path, capsys, monkeypatch):
    folder, file = sd
    monkeypatch.setenv("TUNEQDM_CACHE", str(tmp_path / "cache"))
    tensors = load_file(file)
    cases = {}
    save_file({"foo.weight": torch.zeros(3, 3)}, tmp_path / "unknown.safetensors")
    cases["unknown"] = (tmp_path / "unknown.safetensors",
                        f"{tmp_path / 'unknown.safetensors'} holds no StableDiffusionPipeline unet that diffusers can "
                        "read: pass a single file of SD 1.x/2.x, SDXL or FLUX.1 (and --single_file_config with its "
                        "diffusers pipeline when the file is of another one)")
    partial = {k: v for k, v in tensors.items() if not k.endswith("middle_block.1.proj_out.weight")}
    save_file(partial, tmp_path / "partial.safetensors")
    cases["partial"] = (tmp_path / "partial.safetensors",
                        f"{tmp_path / 'partial.safetensors'} holds part of a UNet2DConditionModel for unet, without "
                        "'mid_block.attentions.0.proj_out.weight' (1 tensors missing): it is not a checkpoint of this "
                        "pipeline's config (pass --single_file_config with the diffusers pipeline the file was made "
                        "from)")
    ints = {k: (v * 100).to(torch.int16) if k.startswith("model.diffusion_model.input_blocks.0.0.") else v
            for k, v in tensors.items()}
    save_file(ints, tmp_path / "ints.safetensors")
    cases["ints"] = (tmp_path / "ints.safetensors", f"{tmp_path / 'ints.safetensors'}: its unet tensor "
                     "'conv_in.weight' is stored as torch.int16, not as a float weight: pass a checkpoint stored in "
                     "fp32, fp16, bf16 or fp8")
    (tmp_path / "truncated.safetensors").write_bytes(file.read_bytes()[:-10])
    cases["truncated"] = (tmp_path / "truncated.safetensors", f"{tmp_path / 'truncated.safetensors'} is truncated (")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    cases["ckpt"] = (tmp_path / "model.ckpt", f"{tmp_path / 'model.ckpt'} is not a .safetensors file: pass a "
                     "single-file checkpoint saved with safetensors (.ckpt files are pickles, which can run code), a "
                     "diffusers pipeline folder or a hub id")
    for name, (path, message) in cases.items():
        capsys.readouterr()
        assert main(_train(path, photos, tmp_path / name, "--single_file_config", str(folder))) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"tuneqdm: error: {message}") and err.count("\n") == 1, (name, err)
        assert not (tmp_path / name).exists()
    monkeypatch.setattr(sf.shutil, "disk_usage", lambda path: Usage(10**12, 10**12, 1000))
    with pytest.raises(TuneQDMError, match=r"^converting model.safetensors needs about 0.00 GiB in .* and its disk has "
                                           r"0.00 GiB free: free space or set \$TUNEQDM_CACHE to another disk$"):
        resolve(file, single_file_config=str(folder))
    assert not any((tmp_path / "cache" / "single-file").glob("*/*/*.safetensors*"))  # no conversion was written
    with pytest.raises(TuneQDMError, match="^--single_file_config gives the configs of a single-file checkpoint, "
                                           f"but {folder} is not one: drop --single_file_config$"):
        resolve(folder, single_file_config=str(folder))
    with pytest.raises(TuneQDMError, match=f"^--single_file_config {tmp_path} has no model_index.json"):
        resolve(file, single_file_config=str(tmp_path))
