"""Tiny random diffusers pipelines (SD-1.x style and SDXL), built in code and saved to a folder for the train/generate
tests. The tokenizer is a real ``CLIPTokenizer`` over a few dozen byte-level symbols (no merges), so any lowercase
prompt tokenizes, letter by letter."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

MAX_LEN = 16


def tiny_tokenizer(folder: Path | None = None):
    """A ``CLIPTokenizer`` over single characters (built in ``folder``, or in a temporary one)."""
    from transformers import CLIPTokenizer

    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return tiny_tokenizer(Path(tmp))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ".,!?'-<>")
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LEN)


def _text_encoder(vocab_size, hidden, projection=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=MAX_LEN, projection_dim=projection or hidden,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         sample_size=32)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_sd_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``StableDiffusionPipeline`` (UNet (32, 64), cross-attention 32, 32 px images -> 16x16x4 latents) saved in
    ``folder``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    folder = Path(folder)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16)
    pipe = StableDiffusionPipeline(vae=_vae(seed), text_encoder=_text_encoder(len(tok), 32, seed=seed), tokenizer=tok,
                                   unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``StableDiffusionXLPipeline`` with two tiny text encoders (hidden 16 + 16 = cross-attention 32, pooled 32)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    folder = Path(folder)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=1,
        use_linear_projection=True)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed), text_encoder=_text_encoder(len(tok), 16, seed=seed), tokenizer=tok,
        text_encoder_2=_text_encoder(len(tok), 16, projection=32, seed=seed + 1), tokenizer_2=tok, unet=unet,
        scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder)
    return folder


def _t5(vocab_size, d_model=32, seed=0):
    """A tiny ``T5EncoderModel`` (any tokenizer's vocabulary; relative positions, so any prompt length)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
                   decoder_start_token_id=0)
    return T5EncoderModel(cfg)


def _flow_vae(seed=0, latent_channels=4):
    """The VAE of a flow-matching pipeline: Flux and SD3 read ``shift_factor`` as well as ``scaling_factor``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, norm_num_groups=8,
                         sample_size=32, shift_factor=0.0609, scaling_factor=1.5035)


def tiny_flux_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``FluxPipeline`` (FLUX.1-dev's layout: CLIP + T5, guidance embedding, 1 double + 1 single block; 32 px images
    -> 16x16x4 latents -> 64 packed tokens of 16 channels). The CLIP tokenizer also serves as the T5 tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    folder = Path(folder)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(seed),
                        text_encoder=_text_encoder(len(tok), 32, seed=seed), tokenizer=tok,
                        text_encoder_2=_t5(len(tok), 32, seed=seed + 1), tokenizer_2=tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def tiny_sd3_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``StableDiffusion3Pipeline``: two CLIP encoders (hidden 16 + 16, pooled 16 + 16) and a T5 (32), an
    ``SD3Transformer2DModel`` of 2 joint blocks over 16x16x4 latents (patch 2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(seed),
        text_encoder=_text_encoder(len(tok), 16, projection=16, seed=seed), tokenizer=tok,
        text_encoder_2=_text_encoder(len(tok), 16, projection=16, seed=seed + 1), tokenizer_2=tok,
        text_encoder_3=_t5(len(tok), 32, seed=seed + 2), tokenizer_3=tok)
    pipe.save_pretrained(folder)
    return folder


def tiny_pixart_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``PixArtSigmaPipeline``: T5 (32) and a ``PixArtTransformer2DModel`` of 2 blocks with learned variance
    (8 output channels for 4 latent ones), DDIM sampling over DDPM training timesteps."""
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    folder = Path(folder)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=_t5(len(tok), 32, seed=seed), vae=_vae(seed),
                               transformer=transformer, scheduler=_scheduler())
    pipe.save_pretrained(folder)
    return folder


def tiny_chroma_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``ChromaPipeline`` (FLUX.1's packed layout without CLIP or a guidance embedding: T5 (32) and a
    ``ChromaTransformer2DModel`` of 1 double + 1 single block with a 1-layer guidance approximator; 32 px images ->
    16x16x4 latents -> 64 packed tokens of 16 channels)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
                                           approximator_hidden_dim=32, approximator_layers=1)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(seed),
                          text_encoder=_t5(len(tok), 32, seed=seed + 1), tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def tiny_gemma_tokenizer(text: str = ""):
    """A ``GemmaTokenizer`` (BPE without merges) over the single characters of ``text``, letters and digits: every
    prompt and the pipeline's own templates tokenize, one token per character."""
    from transformers import GemmaTokenizer

    chars = sorted(set(text + string.ascii_letters + string.digits + " .,!?'-<>:") - {" "})
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    return GemmaTokenizer(vocab={t: i for i, t in enumerate(specials + ["▁"] + chars)}, merges=[])


def tiny_sana_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``SanaPipeline``: a 2-layer Gemma 2 encoder (32) whose tokenizer holds every character of the pipeline's
    default instruction, a deep-compression autoencoder (4 latent channels, 2x down: 32 px -> 16x16x4), a
    ``SanaTransformer2DModel`` of 1 block, and the flow-matching DPM-Solver SANA ships."""
    import inspect

    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    folder = Path(folder)
    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    tok = tiny_gemma_tokenizer("\n".join(instruction))
    torch.manual_seed(seed)
    encoder = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       max_position_embeddings=2048, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=32, sample_size=16, patch_size=1)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=tok, text_encoder=encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


# A chat template of the shape Qwen3's has (user turns, then the assistant's turn opened; thinking switchable),
# written for these tests: the pipelines that read prompts in a chat template only need one that renders.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
                 "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


# how the tiny byte-level tokenizers split text before BPE: words (with their leading space), runs of blanks, symbols
WORDS = r" ?[A-Za-z]+|\s+|[^\sA-Za-z]"


def _byte_level_bpe(words_of: str, specials) -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE: one token per byte, except the words of ``words_of`` (e.g. a pipeline's
    prompt template, its special tokens left out), which get merges into one token each."""
    from tokenizers import Regex, pre_tokenizers

    vocab = {t: i for i, t in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    plain = words_of
    for special in specials:
        plain = plain.replace(special, "\n")
    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(WORDS), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for word, _ in split.pre_tokenize_str(plain):
        for i in range(1, len(word)):
            if word[:i + 1] not in vocab:
                merges.append((word[:i], word[i]))
                vocab[word[:i + 1]] = len(vocab)
    return vocab, merges


def tiny_qwen_tokenizer(chat_template: str | None = CHAT_TEMPLATE, words_of: str = ""):
    """A byte-level ``Qwen2Tokenizer`` with Qwen's chat special tokens: one token per byte, except the words of
    ``words_of`` (e.g. a pipeline's prompt template), which get BPE merges into one token each, as Qwen's own
    tokenizer has them, so that a template's token count is the real one."""
    from transformers import Qwen2Tokenizer

    specials = ["<|im_start|>", "<|im_end|>"]
    vocab, merges = _byte_level_bpe(words_of, specials)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=specials)
    tok.chat_template = chat_template
    return tok


def _qwen3(vocab_size, hidden=16, layers=2, seed=0):
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    return Qwen3Model(Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  max_position_embeddings=512))


def tiny_zimage_pipeline(folder: Path, seed: int = 0, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A ``ZImagePipeline``: a 2-layer Qwen3 (16; the pipeline reads its second-to-last hidden layer) with a chat
    template, a ``ZImageTransformer2DModel`` of 1 layer + 1 refiner layer each side over 16x16x4 latents (patch 2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    folder = Path(folder)
    tok = tiny_qwen_tokenizer(chat_template)
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(seed),
                          text_encoder=_qwen3(len(tok), seed=seed + 1), tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def tiny_qwenimage_pipeline(folder: Path, seed: int = 0) -> Path:
    """A ``QwenImagePipeline``: a 2-layer Qwen2.5-VL (16; its 1-block vision tower unused) whose tokenizer has the
    words of the pipeline's prompt template as single tokens (the template's 34 dropped tokens are the real 34), a
    video VAE (2x down: 32 px -> 16x16x4, per-channel mean and std), a ``QwenImageTransformer2DModel`` of 1 block
    over 64 packed tokens of 16 channels."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    template = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")
    tok = tiny_qwen_tokenizer(words_of=template)
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, patch_size=2,
                  temporal_patch_size=1, window_size=4, fullatt_block_indexes=[0])
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(4, 6, 6))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=encoder,
                             tokenizer=tok, transformer=transformer)
    pipe.default_sample_size = 16  # not saved: the pipeline's 128 (1024 px) is the family's native size
    pipe.save_pretrained(folder)
    return folder


def tiny_flux2_klein_pipeline(folder: Path, seed: int = 0, encoder_layers: int = 27,
                              chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A ``Flux2KleinPipeline``: a Qwen3 causal LM of width 16 and ``encoder_layers`` layers (the pipeline reads hidden
    layers 9, 18 and 27, so 27 deep by default), a VAE with 4 latent channels and batch-norm statistics (2x down,
    patchified: 32 px -> 8x8x16), a ``Flux2Transformer2DModel`` of 1 double + 1 single block over 64 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = Path(folder)
    tok = tiny_qwen_tokenizer(chat_template)
    torch.manual_seed(seed)
    encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=encoder_layers, num_attention_heads=2,
                                           num_key_value_heads=1,
                                           head_dim=8, max_position_embeddings=512, tie_word_embeddings=True))
    vae, transformer = _tiny_flux2_models(guidance_embeds=False)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=encoder,
                              tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def _tiny_flux2_models(guidance_embeds: bool):
    """The VAE and transformer of the tiny FLUX.2 pipelines ([klein] without guidance embeddings, [dev] with)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    vae = AutoencoderKLFlux2(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                             sample_size=32, layers_per_block=1)
    with torch.no_grad():  # the batch norm's statistics as a trained VAE has them (not 0 and 1)
        vae.bn.running_mean.copy_(0.2 * torch.randn(16))
        vae.bn.running_var.copy_(0.5 + torch.rand(16))
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=16, guidance_embeds=guidance_embeds,
                                          axes_dims_rope=(4, 4, 4, 4))
    return vae, transformer


# A chat template of the shape Mistral Small 3.1's has (a system prompt, then instructions; message contents as lists
# of typed parts, as Flux2Pipeline passes them), written for these tests.
MISTRAL_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% for part in m['content'] %}"
                         "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ part['text'] }}[/SYSTEM_PROMPT]"
                         "{% else %}[INST]{{ part['text'] }}[/INST]{% endif %}{% endfor %}{% endfor %}")
MISTRAL_SPECIALS = ["<s>", "</s>", "<pad>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"]


def tiny_mistral_tokenizer(chat_template: str | None = MISTRAL_CHAT_TEMPLATE, words_of: str = ""):
    """A byte-level BPE built with the ``tokenizers`` library (as Mistral's Tekken is one), with Mistral's chat special
    tokens: one token per byte, except the words of ``words_of`` (the pipeline's system message), one token each."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_level_bpe(words_of, MISTRAL_SPECIALS)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(WORDS), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(MISTRAL_SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = chat_template
    return tok


def tiny_flux2_pipeline(folder: Path, seed: int = 0, encoder_layers: int = 30,
                        chat_template: str | None = MISTRAL_CHAT_TEMPLATE) -> Path:
    """A ``Flux2Pipeline`` (FLUX.2 [dev]): a ``Mistral3ForConditionalGeneration`` whose language model is 16 wide and
    ``encoder_layers`` deep (the pipeline reads hidden layers 10, 20 and 30, so 30 by default; its 1-layer Pixtral
    vision tower unused), its tokenizer with the words of the pipeline's system message as single tokens; FLUX.2
    [klein]'s VAE and a ``Flux2Transformer2DModel`` of 1 double + 1 single block with a guidance embedding (FLUX.2
    [dev] is guidance-distilled)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    folder = Path(folder)
    tok = tiny_mistral_tokenizer(chat_template, words_of=SYSTEM_MESSAGE)
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=encoder_layers,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                  patch_size=2, image_size=16)
    encoder = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                              spatial_merge_size=1))
    vae, transformer = _tiny_flux2_models(guidance_embeds=True)
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=encoder,
                         tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder
