"""The shipped toy-world evaluators: files, interface, and a few real properties on fresh gate-seed images."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tuneqdm.errors import TuneQDMError
from tuneqdm.eval import (ImageEncoder, ImageTextEncoder, clip_i_score, clip_t_score, cosine_matrix, dino_score,
                          zero_shot_classify)
from tuneqdm.toy import CLASSES, PLACES, Scene, make_dataset, make_instance, render, subject_photos
from tuneqdm.toy.evaluators import (CLIP_FILE, DINO_FILE, UNK, WEIGHTS_DIR, class_prompts, load_toy_clip,
                                    load_toy_dino, toy_vocabulary)
from tuneqdm.toy.world import sample_pose, seed_entropy

GATE = 20_000_000  # evaluator gates use world seeds in [20_000_000, 30_000_000)


@pytest.fixture(scope="module")
def clip():
    return load_toy_clip()


@pytest.fixture(scope="module")
def dino():
    return load_toy_dino()


@pytest.fixture(scope="module")
def scenes():
    images, captions, scenes = make_dataset(GATE + 7, 12)
    return images, captions, scenes


def test_shipped_files_load_and_are_small(clip, dino):
    assert isinstance(clip, ImageTextEncoder) and isinstance(dino, ImageEncoder)
    assert clip.name == "toy-clip" and dino.name == "toy-dino"
    assert not clip.training and not dino.training
    files = [WEIGHTS_DIR / CLIP_FILE, WEIGHTS_DIR / DINO_FILE]
    assert sum(f.stat().st_size for f in files) <= 3_000_000
    for f in files:
        assert f.with_suffix(".json").is_file()


def test_embeddings_are_normalised_and_deterministic(clip, dino, scenes):
    images, captions, _ = scenes
    for enc in (clip, dino):
        a = enc.encode_images(images)
        b = enc.encode_images(list(images[:5]) + [Image.fromarray(im) for im in images[5:]])
        assert a.dtype == torch.float32 and a.shape == (len(images), 128)
        torch.testing.assert_close(a.norm(dim=1), torch.ones(len(images)))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    t = clip.encode_texts(captions)
    torch.testing.assert_close(t, clip.encode_texts(captions), rtol=0, atol=0)
    torch.testing.assert_close(t.norm(dim=1), torch.ones(len(captions)))
    # other sizes and modes are resized / converted
    big = Image.fromarray(images[0]).resize((256, 256), Image.Resampling.NEAREST)
    e = clip.encode_images([big, np.asarray(big.convert("RGBA")), images[0]])
    assert float(e[0] @ e[2]) > 0.95 and float(e[1] @ e[2]) > 0.95
    with pytest.raises(TuneQDMError, match="uint8"):
        clip.encode_images([images[0].astype(np.float32)])


def test_clip_like_picks_the_class_and_place(clip, scenes):
    images, _, sc = scenes
    pred = zero_shot_classify(clip, images, class_prompts())
    right = sum(int(p) == CLASSES.index(s.noun) for p, s in zip(pred, sc))
    assert right >= len(sc) - 2, (right, len(sc))  # about 97 % on the gate benchmark
    # a place prompt for every image of one noun: the scene's own place wins for most of them
    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy(GATE + 8, "test-places")))
    imgs, truth = [], []
    for i, place in enumerate(PLACES):
        s = Scene("house", "red", None, place, *_pose(rng, "house"))
        imgs.append(render(s, rng))
        truth.append(i)
    pred = zero_shot_classify(clip, imgs, [f"a house {p}" for p in PLACES.values()])
    assert sum(int(p) == t for p, t in zip(pred, truth)) >= len(PLACES) - 1
    # CLIP-T prefers each image's own caption
    _, captions, _ = scenes
    own = clip_t_score(clip, images, captions)
    other = clip_t_score(clip, images, captions[1:] + captions[:1])
    assert own > other + 0.1


def _pose(rng, noun):
    size, x, y, angle, flip = sample_pose(rng, noun)
    return x, y, size, angle, flip


def test_dino_like_ranks_the_same_instance_first(dino):
    n = 6
    gallery, queries = [], []
    for i in range(n):
        inst = make_instance(GATE + 500 + i)
        (s0, g), (s1, q) = subject_photos(inst, GATE + 500 + i, 2)
        gallery.append(g)
        queries.append(q)
    sim = cosine_matrix(dino.encode_images(queries), dino.encode_images(gallery))
    assert (sim.argmax(1) == torch.arange(n)).sum() >= n - 1
    assert float(sim.diag().mean()) > float(sim[~torch.eye(n, dtype=torch.bool)].mean()) + 0.2
    # DINO score: a subject's photos against themselves vs against another subject's
    same = dino_score(dino, gallery[:1], queries[:1])
    assert same > dino_score(dino, gallery[:1], queries[1:])
    assert -1.0 <= clip_i_score(dino, gallery, queries) <= 1.0


def test_words_outside_the_vocabulary_work(clip):
    vocab = toy_vocabulary()
    assert "sks" not in vocab and "dog" not in vocab and "<unk>" in vocab
    assert all(w in vocab for p in PLACES.values() for w in p.split())
    ids = clip.text.tokenize(["a sks dog", "Zebra!!", ""])
    assert (ids[0, 2:4] == UNK).all() and ids[1, 1] == UNK and ids[2, 0] != UNK
    e = clip.encode_texts(["a sks star", "a dog", "photo of a very very " + "long " * 60 + "thing", "", "a star",
                           "a heart"])
    assert torch.isfinite(e).all()
    torch.testing.assert_close(e.norm(dim=1), torch.ones(len(e)))
    assert float(e[0] @ e[4]) > float(e[0] @ e[5])  # "a sks star" stays a star


def _copy(tmp_path, name):
    for suffix in (".safetensors", ".json"):
        shutil.copy(WEIGHTS_DIR / name.replace(".safetensors", suffix), tmp_path / name.replace(".safetensors",
                                                                                                  suffix))
    return tmp_path / name


def test_truncated_or_missing_weights_say_reinstall(tmp_path):
    path = _copy(tmp_path, CLIP_FILE)
    assert load_toy_clip(path).name == "toy-clip" and load_toy_clip(tmp_path).name == "toy-clip"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = (f"toy evaluator weights {path} are missing or corrupted: reinstall tuneqdm "
           "(pip install --force-reinstall tuneqdm)")
    with pytest.raises(TuneQDMError) as e:
        load_toy_clip(path)
    assert str(e.value) == msg
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(TuneQDMError, match="reinstall tuneqdm"):
        load_toy_clip(path)
    dpath = _copy(tmp_path, DINO_FILE)
    dpath.unlink()
    with pytest.raises(TuneQDMError) as e:
        load_toy_dino(dpath)
    assert str(e.value) == msg.replace(str(path), str(dpath))
    with pytest.raises(TuneQDMError, match="reinstall tuneqdm"):
        load_toy_clip(_copy(tmp_path, DINO_FILE))  # a DINO file is not a CLIP file


def test_training_script_smoke(tmp_path):
    from recipes.train_evaluators import main

    out = tmp_path / "w"
    assert main(["--which", "dino", "--out", str(out)]) == 2  # no CLIP-like weights to start from: one-line error
    assert main(["--which", "both", "--clip-steps", "2", "--dino-steps", "2", "--clip-scenes", "160",
                 "--clip-instances", "8", "--dino-families", "12", "--batch", "32", "--val-every", "1000",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["toy_clip.json", "toy_clip.safetensors", "toy_dino.json",
                                                     "toy_dino.safetensors", "train_log_clip.json",
                                                     "train_log_dino.json"]
    assert load_toy_clip(out).encode_texts(["a star"]).shape == (1, 128)
    assert load_toy_dino(out).train_config["training"]["steps"] == 2
