import itertools
import json
import time
from dataclasses import fields, replace

import numpy as np
import pytest

from tuneqdm.cli import main
from tuneqdm.errors import TuneQDMError
from tuneqdm.toy import (CLASSES, COLOURS, EVAL_PROMPT_TEMPLATES, MATERIALS, PLACES, Instance, Scene, caption,
                         eval_prompt_targets, eval_prompts, make_dataset, make_instance, render, sample_scene,
                         subject_photos, write_subject)
from tuneqdm.toy.world import background


def _scene(noun="star", colour="red", material=None, place=None, **kw):
    pose = dict(x=0.5, y=0.5, size=0.55, angle=0.0, flip=False)
    pose.update(kw)
    return Scene(noun, colour, material, place, **pose)


def _object_mask(img, place=None, rng_seed=0):
    """Pixels that differ from the same background without the object."""
    bare = render(_scene(size=1e-4, place=place), np.random.default_rng(rng_seed))
    return np.abs(img.astype(int) - bare.astype(int)).sum(-1) > 60


def _interior(mask, r=2):
    out = mask.copy()
    for axis in (0, 1):
        for d in range(1, r + 1):
            out &= np.roll(mask, d, axis) & np.roll(mask, -d, axis)
    return out


def test_vocabulary():
    assert CLASSES == ("star", "heart", "ball", "box", "pyramid", "moon", "cross", "arrow", "house", "ring")
    assert list(COLOURS) == ["red", "orange", "yellow", "green", "blue", "purple", "white", "black"]
    assert min(np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(COLOURS.values(), 2)) > 80
    assert MATERIALS == ("shiny", "glass", "metal")
    assert len(PLACES) == 12 and PLACES["beach"] == "on the beach" and PLACES["rug"] == "on top of a white rug"


def test_captions_follow_the_grammar():
    assert caption(_scene(place="beach")) == "a red star on the beach"
    assert caption(_scene(colour=None, place="city")) == "a star with a city in the background"
    assert caption(_scene(colour="purple")) == "a purple star"
    assert caption(_scene(colour="orange")) == "an orange star"
    assert caption(_scene("arrow", None)) == "an arrow"
    assert caption(_scene("heart", "blue", "shiny", "snow")) == "a shiny blue heart in the snow"
    assert caption(_scene(colour=None, place="snow"), token="sks") == "a sks star in the snow"
    assert caption(_scene("ring", "red", "metal", "grass")) == \
        "a metal ring on top of green grass with flowers around it"
    assert caption(_scene("box", "red", "glass"), token="sks") == "a glass red sks box"
    inst = make_instance(3)
    assert caption(_scene(inst.noun, None, instance=inst), token="sks") == f"a sks {inst.noun}"


def test_make_dataset_is_deterministic_and_seeded():
    a, ca, sa = make_dataset(7, 6)
    b, cb, sb = make_dataset(7, 6)
    c, _, _ = make_dataset(8, 6)
    assert a.shape == (6, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and ca == cb and sa == sb
    assert not np.array_equal(a, c)
    assert ca == [caption(s) for s in sa]
    assert np.array_equal(make_dataset(7, 3)[0], a[:3])  # a prefix of a longer dataset
    for seed in (-5, -(2 ** 70), 2 ** 100, np.int64(3)):
        x, _, _ = make_dataset(seed, 2)
        assert x.shape == (2, 64, 64, 3)
    assert not np.array_equal(make_dataset(-5, 2)[0], make_dataset(5, 2)[0])


def test_render_without_rng_is_a_function_of_the_scene():
    s = _scene(place="night")
    assert np.array_equal(render(s), render(s))
    assert not np.array_equal(render(s), render(replace(s, x=0.45)))
    r1, r2 = render(s, np.random.default_rng(1)), render(s, np.random.default_rng(2))
    assert not np.array_equal(r1, r2)  # the rng varies the background


def test_every_noun_colour_material_and_place_renders_a_visible_object():
    masks = {}
    for noun in CLASSES:
        img = render(_scene(noun, "white"), np.random.default_rng(0))
        diff = _object_mask(img)
        masks[noun] = diff
        assert 0.12 < diff.mean() < 0.6, noun
    for a, b in itertools.combinations(CLASSES, 2):  # distinct silhouettes
        assert (masks[a] ^ masks[b]).mean() > 0.04, (a, b)
    for colour, rgb in COLOURS.items():
        img = render(_scene("ball", colour, size=0.6))
        assert np.linalg.norm(img[30:34, 34:38].reshape(-1, 3).mean(0) - rgb) < 70, colour
    for material in MATERIALS:
        img = render(_scene("cross", "blue", material, "brick"))
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    metal = render(_scene("box", "red", "metal"))[28:36, 20:28].astype(int)
    assert np.abs(metal[..., 0] - metal[..., 2]).mean() < 25  # metal ignores the colour
    for place in PLACES:
        img = render(_scene("arrow", "yellow", None, place))
        assert img.shape == (64, 64, 3) and img.std() > 10


def test_glass_shows_the_background_through():
    s = _scene("ball", "blue", "glass", size=0.7)
    on_night = render(replace(s, place="night"))[28:36, 24:32].astype(float).mean()
    on_snow = render(replace(s, place="snow"))[28:36, 24:32].astype(float).mean()
    solid_night = render(replace(s, material=None, place="night"))[28:36, 24:32].astype(float).mean()
    solid_snow = render(replace(s, material=None, place="snow"))[28:36, 24:32].astype(float).mean()
    assert on_snow - on_night > 3 * abs(solid_snow - solid_night) + 20


def test_places_differ_at_low_frequency():
    rng = np.random.default_rng(0)
    keys = [None, *PLACES]
    means = {k: np.mean([background(k, rng).mean((0, 1)) for _ in range(8)], axis=0) for k in keys}
    dists = {(a, b): np.linalg.norm(means[a] - means[b]) for a, b in itertools.combinations(keys, 2)}
    assert min(dists.values()) > 25, min(dists, key=dists.get)


def test_sample_scene_ranges():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(400)]
    assert all(0.45 <= s.size <= 0.7 and 0 < s.x < 1 and 0 < s.y < 1 for s in scenes)
    assert all(s.colour is None for s in scenes if s.material == "metal")
    assert all(abs(s.angle) <= 25 for s in scenes if s.noun not in ("ball", "ring"))
    assert not any(s.flip for s in scenes if s.noun not in ("arrow", "moon"))
    assert {s.noun for s in scenes} == set(CLASSES) and {s.place for s in scenes} == {None, *PLACES}
    only = [sample_scene(rng, nouns=["moon"], places=["beach"], p_place=1.0, p_colour=0.0) for _ in range(5)]
    assert all(s.noun == "moon" and s.place == "beach" and s.colour is None for s in only)


def test_instances_are_unique_and_recolour_only_the_primary():
    insts = [make_instance(s) for s in range(12)]
    assert make_instance(5) == make_instance(5)
    assert all(i.noun in CLASSES for i in insts)
    for a, b in itertools.combinations(insts, 2):
        assert (a.primary, a.pattern, a.marking) != (b.primary, b.pattern, b.marking)
    inst = insts[0]
    red = inst.recoloured("red")
    assert red.primary == COLOURS["red"]
    assert all(getattr(red, f.name) == getattr(inst, f.name) for f in fields(Instance) if f.name != "primary")
    assert Instance.from_dict(json.loads(json.dumps(inst.to_dict()))) == inst
    s = _scene(inst.noun, None, instance=inst, size=0.65)
    plain, recoloured = render(s), render(replace(s, colour="red"))
    assert not np.array_equal(plain, recoloured)
    same = [render(x, np.random.default_rng(0)) for x in (replace(s, instance=red), replace(s, colour="red"))]
    assert np.array_equal(*same)
    # the pattern makes it far more varied than a solid object of the same noun
    solid = render(_scene(inst.noun, "red", size=0.65), np.random.default_rng(0))
    inside = _interior(_object_mask(solid))
    assert inside.mean() > 0.1
    assert same[0][inside].std(0).mean() > 2 * solid[inside].std(0).mean()


def test_subject_photos_vary_the_pose_and_place():
    inst = make_instance(1)
    photos = subject_photos(inst, 1, 6)
    assert len(photos) == 6
    scenes = [s for s, _ in photos]
    assert all(s.instance == inst and s.noun == inst.noun and s.colour is None for s in scenes)
    assert 2 <= len({s.place for s in scenes if s.place}) <= 3
    assert len({(s.x, s.y, s.size) for s in scenes}) == 6
    assert all(img.shape == (64, 64, 3) for _, img in photos)


def test_eval_prompts():
    assert len(EVAL_PROMPT_TEMPLATES) == 25
    prompts, targets = eval_prompts("sks", "star"), eval_prompt_targets()
    assert len(prompts) == len(targets) == 25 and len(set(prompts)) == 25
    assert "a sks star in the snow" in prompts and "a red sks star" in prompts and "a metal sks star" in prompts
    for text, t in zip(prompts, targets):
        assert set(t) == {"place", "colour", "material"}
        scene = _scene("star", t["colour"], t["material"], t["place"])
        assert caption(scene, token="sks") == text
    assert sum(t["place"] is not None and t["colour"] is None for t in targets) == 12
    assert sum(t["colour"] is not None and t["place"] is None for t in targets) == 6
    assert sum(t["material"] is not None for t in targets) == 3
    assert sum(t["colour"] is not None and t["place"] is not None for t in targets) == 4


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_write_subject_is_byte_deterministic_and_atomic(tmp_path):
    meta = write_subject(11, tmp_path / "a")
    write_subject(11, tmp_path / "b")
    write_subject(12, tmp_path / "c", n_photos=4)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b and a != c
    n = len(a) - 1
    assert 4 <= n <= 6 and set(a) == {f"{i:02d}.png" for i in range(n)} | {"subject.json"}
    assert set(c) == {"00.png", "01.png", "02.png", "03.png", "subject.json"}
    saved = json.loads(a["subject.json"])
    assert saved == json.loads(json.dumps(meta))
    inst = make_instance(11)
    assert saved["seed"] == 11 and saved["class"] == inst.noun and saved["token"] == "sks"
    assert saved["instance_prompt"] == f"a sks {inst.noun}" and saved["class_prompt"] == f"a {inst.noun}"
    assert saved["prompts"] == eval_prompts("sks", inst.noun) and saved["targets"] == eval_prompt_targets()
    assert Instance.from_dict(saved["instance"]) == inst
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left
    # force replaces a subject folder; anything else is refused, nothing half-written is left
    write_subject(12, tmp_path / "a", force=True, n_photos=4)
    assert _files(tmp_path / "a") == c
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(TuneQDMError, match="not a toy subject"):
        write_subject(11, tmp_path / "b", force=True)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    (tmp_path / "neg").mkdir()  # an empty folder is fine
    write_subject(-(2 ** 90), tmp_path / "neg", n_photos=1)
    assert (tmp_path / "neg" / "00.png").exists()


def test_cli_toy_subject_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert main(["toy", "subject", "--seed", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"tuneqdm: error: output folder {tmp_path} is not empty: choose another --out or pass --force\n"
    assert (tmp_path / "x").read_text() == "keep me"


def test_cli_toy_commands_accept_negative_seeds(tmp_path, capsys):
    out = tmp_path / "subj"
    assert main(["toy", "subject", "--seed", "-5", "--out", str(out), "--photos", "4"]) == 0
    line = capsys.readouterr().out
    noun = make_instance(-5).noun
    assert line.count("\n") == 1 and f"class {noun}" in line and "4 photos" in line and str(out) in line
    assert main(["toy", "subject", "--seed=-5", "--out", str(tmp_path / "subj2"), "--photos", "4"]) == 0
    capsys.readouterr()
    assert _files(out) == _files(tmp_path / "subj2")
    png = tmp_path / "grid.png"
    assert main(["toy", "scenes", "--seed", "-3", "--num", "5", "--out", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == make_dataset(-3, 5)[1] and png.stat().st_size > 0


def test_render_is_fast():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, p_material=0.5) for _ in range(40)]
    inst = make_instance(0)
    scenes += [_scene(inst.noun, None, m, p, instance=inst) for m in (None, *MATERIALS) for p in ("city", "snow")]
    for s in scenes[:3]:
        render(s, rng)  # warm the background caches
    for p in PLACES:
        render(_scene(place=p))
    t = time.perf_counter()
    for s in scenes:
        render(s, rng)
    per_image = (time.perf_counter() - t) / len(scenes)
    assert per_image < 0.025, f"{per_image * 1000:.1f} ms per image"
