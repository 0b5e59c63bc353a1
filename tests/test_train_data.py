"""Training data: every odd photo is read upright as RGB or skipped with a one-line warning; bad settings and empty
folders are one-line errors raised before any model loads."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from tuneqdm.cli import main
from tuneqdm.errors import TuneQDMError
from tuneqdm.train import TrainConfig, TrainWarning
from tuneqdm.train.data import load_folder, rare_token_problem, read_photo, read_subjects_file


def _messages(record):
    return [str(w.message) for w in record if issubclass(w.category, TrainWarning)]


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = read_photo(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    a = np.asarray(out).astype(int)
    assert a[2, 10, 0] > 200 and a[-3, 10, 2] > 200  # red on top, blue at the bottom: turned upright


def test_cmyk_rgba_16bit_palette_and_grey_become_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.tiff")
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "deep.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    Image.new("L", (8, 8), 100).save(tmp_path / "grey.png")

    assert np.asarray(read_photo(tmp_path / "cmyk.tiff"))[0, 0].tolist() == [255, 0, 0]
    rgb = np.asarray(read_photo(tmp_path / "rgba.png"))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[0, 2].tolist() == [255, 255, 255]  # transparent -> white
    assert rgb[0, 1].tolist() == [255, 127, 127] or rgb[0, 1].tolist() == [255, 128, 128]
    assert np.asarray(read_photo(tmp_path / "deep.png"))[0, 0].tolist() == [128, 128, 128]  # 16-bit rescaled
    assert np.asarray(read_photo(tmp_path / "pal.png"))[0, 0].tolist() == [0, 255, 0]
    assert np.asarray(read_photo(tmp_path / "grey.png"))[0, 0].tolist() == [100, 100, 100]
    for name in ("cmyk.tiff", "rgba.png", "deep.png", "pal.png", "grey.png"):
        assert read_photo(tmp_path / name).mode == "RGB"


def test_folder_skips_non_images_and_truncated_files_with_one_warning_each(tmp_path):
    for i in range(2):
        Image.new("RGB", (48, 32), (10 * i, 20, 30)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "fake.png").write_bytes(b"this is no png")
    good = (tmp_path / "0.png").read_bytes()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    (tmp_path / "subject.json").write_text("{}")  # a toy subject's sidecar: silently ignored
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        photos = load_folder(tmp_path, 16, center_crop=True)
    assert [p.path.name for p in photos] == ["0.png", "1.png"]
    assert all(p.pixels.shape == (3, 16, 16) and -1 <= p.pixels.min() and p.pixels.max() <= 1 for p in photos)
    msgs = _messages(record)
    assert f"skipping {tmp_path / 'fake.png'}: not an image" in msgs
    assert f"skipping 1 non-image file in {tmp_path}: notes.txt" in msgs
    assert any(m.startswith(f"skipping {tmp_path / 'cut.png'}: unreadable or truncated image (") for m in msgs)
    assert len(msgs) == 3 and all("\n" not in m for m in msgs)
    assert (tmp_path / "0.png").read_bytes() == good  # never modified


def test_tiny_photos_are_upscaled_with_a_warning_and_crops_are_square(tmp_path):
    Image.new("RGB", (8, 6), (200, 10, 10)).save(tmp_path / "tiny.png")
    Image.new("RGB", (100, 40), (0, 0, 0)).save(tmp_path / "wide.png")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        photos = load_folder(tmp_path, 32, center_crop=False, seed=3)
    assert [tuple(p.pixels.shape) for p in photos] == [(3, 32, 32), (3, 32, 32)]
    assert _messages(record) == [f"{tmp_path / 'tiny.png'} is only 8x6 px, under half of --resolution 32: "
                                 "upscaled, expect blur"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = load_folder(tmp_path, 32, center_crop=False, seed=3)
    assert all((a.pixels == b.pixels).all() for a, b in zip(photos, again))  # random crops are seeded


def test_empty_and_missing_folders_are_one_line_errors(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(TuneQDMError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_folder(tmp_path, 32)
    assert str(e.value) == f"--instance_data_dir {tmp_path} has no readable images (png, jpg, webp, bmp, gif, tiff)"
    with pytest.raises(TuneQDMError) as e:
        load_folder(tmp_path / "nope", 32)
    assert str(e.value) == f"--instance_data_dir {tmp_path / 'nope'} is not a folder"


def test_rare_token_check():
    assert rare_token_problem("a sks dog") is None
    assert rare_token_problem("a photo of my zwx backpack", "a backpack") is None
    msg = ("instance prompt 'a photo of a dog' has no rare identifier token: the model will change its idea of "
           "every such object; add one, e.g. 'a sks dog'")
    assert rare_token_problem("a photo of a dog") == msg
    assert rare_token_problem("a fluffy dog", "a fluffy dog") is not None  # nothing beyond the class prompt


@pytest.mark.parametrize("argv, message", [
    (["--resolution", "60"], "--resolution must be a positive multiple of 8 up to 8192, got 60"),
    (["--method", "s1"], "--method s1 needs --s1_intervals, e.g. --s1_intervals 0-250"),
    (["--method", "s1", "--s1_intervals", "0:250"],
     "--s1_intervals '0:250': write intervals as A-B[,C-D], e.g. 0-250"),
    (["--s1_intervals", "0-250"], "--s1_intervals applies to --method s1 only, not tuneqdm"),
    (["--method", "lora", "--quantized_base", "q"],
     "--quantized_base applies to the quantized methods, not --method lora"),
    (["--max_train_steps", "0"], "--max_train_steps must be at least 1, got 0"),
    (["--learning_rate", "-1"], "--learning_rate must be positive, got -1.0"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["train", "--instance_data_dir", str(tmp_path), *argv]) == 2
    assert capsys.readouterr().err == f"tuneqdm: error: {message}\n"


def test_missing_instance_data_and_both_inputs(tmp_path, capsys):
    assert main(["train"]) == 2
    assert capsys.readouterr().err == ("tuneqdm: error: --instance_data_dir is required "
                                       "(or --subjects FILE for several subjects)\n")
    with pytest.raises(TuneQDMError, match="^give either --subjects or --instance_data_dir/--instance_prompt"):
        TrainConfig(subjects="s.json", instance_data_dir="x")
    out = str(tmp_path / "out")
    assert main(["train", "--instance_data_dir", str(tmp_path), "--output_dir", out]) == 2
    assert capsys.readouterr().err == (f"tuneqdm: error: --instance_prompt is required for {tmp_path} "
                                       '(e.g. "a sks dog")\n')
    assert main(["train", "--instance_data_dir", str(tmp_path), "--instance_prompt", "a sks dog",
                 "--with_prior_preservation", "--output_dir", out]) == 2
    assert capsys.readouterr().err == ('tuneqdm: error: --with_prior_preservation needs --class_prompt '
                                       '(e.g. "a dog")\n')
    assert not (tmp_path / "out").exists()  # nothing written


def test_prompt_warning_is_one_line_before_the_model_loads(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    missing = tmp_path / "no-model"
    code = main(["train", "--instance_data_dir", str(tmp_path), "--instance_prompt", "a dog",
                 "--pretrained_model_name_or_path", str(missing), "--output_dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.splitlines()  # --quiet: no "loading" line, the warning stays
    assert code == 2
    assert err[0] == ("tuneqdm: warning: instance prompt 'a dog' has no rare identifier token: the model will change "
                      "its idea of every such object; add one, e.g. 'a sks dog'")
    assert err[1].startswith(f"tuneqdm: error: cannot load the pipeline {missing}: ") and len(err) == 2


def test_subjects_file(tmp_path):
    (tmp_path / "a").mkdir()
    f = tmp_path / "subjects.json"
    f.write_text(json.dumps([{"instance_data_dir": "a", "instance_prompt": "a sks ball"},
                             {"instance_data_dir": str(tmp_path / "b"), "instance_prompt": "a zwx box"}]))
    entries = read_subjects_file(f)
    assert [e["instance_data_dir"] for e in entries] == [tmp_path / "a", tmp_path / "b"]
    f.write_text(json.dumps([{"folder": "a"}]))
    with pytest.raises(TuneQDMError) as e:
        read_subjects_file(f)
    assert str(e.value) == f'--subjects {f}: entry 0 needs an "instance_data_dir"'
    f.write_text("{")
    with pytest.raises(TuneQDMError, match=r"^--subjects .* is not valid JSON \("):
        read_subjects_file(f)
