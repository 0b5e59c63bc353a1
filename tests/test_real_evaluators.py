"""The real DINO and CLIP evaluators, on tiny random models built here (never downloaded)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tuneqdm.errors import TuneQDMError
from tuneqdm.eval import clip_t_score, dino_score
from tuneqdm.eval.real import ClipEncoder, DinoEncoder


def _images(n=3, side=40):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    d = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32,
                    patch_size=16)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from tiny_pipelines import MAX_LEN, tiny_tokenizer

    d = tmp_path_factory.mktemp("clip")
    tok = tiny_tokenizer(d)  # letter-level CLIP BPE: no download, no open-clip-torch
    tok.save_pretrained(d)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=MAX_LEN,
                                      eos_token_id=tok.eos_token_id, **small),
                     vision_config=dict(image_size=32, patch_size=16, **small), projection_dim=16)
    CLIPModel(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def test_dino_is_the_normalised_cls_token_batched_or_not(dino_dir):
    enc = DinoEncoder(str(dino_dir), batch_size=2)
    images = _images()
    got = enc.encode_images(images)
    pixels = enc.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = enc.model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(got, torch.nn.functional.normalize(cls, dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, DinoEncoder(str(dino_dir), batch_size=32).encode_images(images))
    torch.testing.assert_close(enc.encode_images([np.asarray(im) for im in images]), got)  # arrays == PIL
    assert dino_score(enc, images[:1], images[:1]) == pytest.approx(1.0, abs=1e-5)


def test_clip_image_and_text_embeddings_match_the_model(clip_dir):
    enc = ClipEncoder(str(clip_dir), batch_size=2)
    images, prompts = _images(), ["a sks dog on the beach", "a red cube", "a photo of a very long " + "dog " * 90]
    img, txt = enc.encode_images(images), enc.encode_texts(prompts)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    tok = enc.tokenizer(prompts[:1], truncation=True, max_length=enc.model.config.text_config.max_position_embeddings,
                        return_tensors="pt")
    with torch.no_grad():
        out = enc.model.get_text_features(**tok)
    want = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(txt[:1], torch.nn.functional.normalize(want, dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.encode_texts(prompts[1:2]), txt[1:2], rtol=1e-5, atol=1e-6)  # padding-invariant
    assert clip_t_score(enc, images, prompts) == pytest.approx(float((img * txt).sum(-1).mean()), abs=1e-6)


@pytest.mark.parametrize("cls,what", [(DinoEncoder, "DINO"), (ClipEncoder, "CLIP")])
def test_unloadable_id_is_one_line_naming_the_toy_evaluator(tmp_path, cls, what):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(TuneQDMError) as e:
        cls(missing)
    assert str(e.value) == (f"cannot load the {what} evaluator {missing!r} (not a cached or reachable model id): "
                            "connect to the Hugging Face Hub once to cache it, or pass --evaluator toy")
