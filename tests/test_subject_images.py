"""Every subject photo is either converted to the RGB it shows or refused: 16-bit, palette, CMYK, grayscale
and alpha images keep their tones (checked pixel by pixel, not by mode), each conversion is reported in refine's
manifest, and links out of the folder, oversized files and bombs are refused before any photo is decoded."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFile

from subjectops.data.subject import ALPHA_BACKGROUND, load_subject
from subjectops.errors import SubjectError
from subjectops.stages.common import partial_dir
from subjectops.stages.refine import refine

SIZE = (96, 80)  # above the tiny preset's 64 px training resolution


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """A subject folder with three ordinary RGB photos; each test adds the photo under test as 99.png."""
    d = tmp_path / "my_toy"
    d.mkdir()
    for i in range(3):
        Image.fromarray(noise(i)).save(d / f"{i:02d}.png")
    return d


def loaded(params, folder):
    """The photo under test (99.*), as subjectops reads it: full size, 8-bit RGB."""
    subject = load_subject(folder, params.subject, 64)
    index = [s["file"].startswith("99.") for s in subject.sources].index(True)
    return np.asarray(subject.originals[index]), subject


def refuse(params, folder, tmp_path, *fragments):
    out = tmp_path / "run" / "refine"
    with pytest.raises(SubjectError) as err:
        refine(params, folder, "toy", out)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert err.value.fix
    assert not out.exists() and not partial_dir(out).exists()


def test_16_bit_gray_ramp_keeps_its_tones(tiny_params, folder, tmp_path):
    ramp = np.linspace(0, 65535, SIZE[0] * SIZE[1]).round().astype(np.uint16).reshape(SIZE[1], SIZE[0])
    Image.fromarray(ramp).save(folder / "99.png")
    assert Image.open(folder / "99.png").mode == "I;16"
    pixels, _ = loaded(tiny_params, folder)
    expected = np.round(ramp / 257).astype(np.uint8)
    assert (pixels == expected[..., None]).all()  # every pixel, in all three channels
    assert abs(pixels.mean() - 127.5) < 0.5 and (pixels == 255).mean() < 0.01  # not 97% white
    out = refine(tiny_params, folder, "toy", tmp_path / "run" / "refine")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["conversions"] == [{"file": "99.png", "mode": "I;16",
                                        "conversion": "I;16 (16-bit grayscale) scaled to 8 bits (value / 257)"}]
    assert json.loads((out / "subject.json").read_text())["conversions"] == manifest["conversions"]
    trained = np.asarray(Image.open(out / "images" / "03.png"))
    assert abs(trained.mean() - 127.5) < 3  # the training image of the ramp is mid-gray on average


def test_rgba_subject_is_composited_on_the_documented_background(tiny_params, folder):
    rgba = np.zeros((SIZE[1], SIZE[0], 4), np.uint8)
    rgba[..., 1] = 255  # green hidden under the transparent ground: dropping alpha would show it
    rgba[20:60, 30:70] = (255, 0, 0, 255)  # the red subject, opaque
    rgba[0, 0] = (255, 0, 0, 128)  # a half-transparent red edge pixel
    Image.fromarray(rgba, "RGBA").save(folder / "99.png")
    pixels, subject = loaded(tiny_params, folder)
    assert ALPHA_BACKGROUND == (255, 255, 255)
    assert (pixels[20:60, 30:70] == (255, 0, 0)).all()
    ground = np.ones(SIZE[::-1], bool)
    ground[20:60, 30:70] = False
    ground[0, 0] = False
    assert (pixels[ground] == ALPHA_BACKGROUND).all()  # no green anywhere
    assert np.abs(pixels[0, 0].astype(int) - (255, 127, 127)).max() <= 1  # 128/255 red over white
    assert subject.conversions[0]["mode"] == "RGBA"
    assert "composited on RGB (255, 255, 255)" in subject.conversions[0]["conversion"]


def test_mostly_transparent_image_is_refused(tiny_params, folder, tmp_path):
    rgba = np.zeros((SIZE[1], SIZE[0], 4), np.uint8)
    rgba[:5, :5] = (255, 0, 0, 255)  # 25 of 7680 pixels opaque
    Image.fromarray(rgba, "RGBA").save(folder / "99.png")
    refuse(tiny_params, folder, tmp_path, "99.png is 100% transparent", "subject would be lost")


def test_gray_with_alpha_and_palette_with_transparent_index(tiny_params, folder):
    la = np.zeros((SIZE[1], SIZE[0], 2), np.uint8)
    la[..., 0] = 40
    la[..., 1] = 255
    la[:10] = (0, 0)  # a transparent strip
    Image.fromarray(la, "LA").save(folder / "99.png")
    pixels, _ = loaded(tiny_params, folder)
    assert (pixels[10:] == 40).all() and (pixels[:10] == ALPHA_BACKGROUND).all()

    (folder / "99.png").unlink()
    index = np.zeros(SIZE[::-1], np.uint8)
    index[:, 40:] = 1
    index[:8] = 2
    pal = Image.fromarray(index, "P")
    pal.putpalette([10, 200, 30, 250, 120, 0, 0, 0, 0])
    pal.save(folder / "99.png", transparency=2)
    pixels, subject = loaded(tiny_params, folder)
    assert (pixels[8:, :40] == (10, 200, 30)).all() and (pixels[8:, 40:] == (250, 120, 0)).all()
    assert (pixels[:8] == ALPHA_BACKGROUND).all()  # index 2 (black in the palette) was transparent
    assert subject.conversions[0]["mode"] == "P"


def test_palette_grayscale_and_bilevel_keep_their_values(tiny_params, folder):
    index = np.arange(SIZE[0] * SIZE[1]).reshape(SIZE[::-1]) % 3
    pal = Image.fromarray(index.astype(np.uint8), "P")
    palette = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    pal.putpalette([c for rgb in palette for c in rgb])
    pal.save(folder / "99.png")
    pixels, _ = loaded(tiny_params, folder)
    assert (pixels == np.array(palette, np.uint8)[index]).all()

    gray = noise(7)[..., 0]
    Image.fromarray(gray, "L").save(folder / "99.png")
    pixels, subject = loaded(tiny_params, folder)
    assert (pixels == gray[..., None]).all()
    assert subject.conversions == [{"file": "99.png", "mode": "L",
                                    "conversion": "L (8-bit grayscale) converted to RGB"}]

    Image.fromarray(gray > 127).save(folder / "99.png")
    assert Image.open(folder / "99.png").mode == "1"
    pixels, _ = loaded(tiny_params, folder)
    assert (pixels == np.where(gray > 127, 255, 0)[..., None]).all()


def test_cmyk_jpeg_becomes_the_rgb_it_prints(tiny_params, folder):
    cmyk = np.zeros((SIZE[1], SIZE[0], 4), np.uint8)
    cmyk[:, :48] = (0, 255, 255, 0)  # red ink
    cmyk[:, 48:] = (0, 0, 0, 128)  # half black
    Image.fromarray(cmyk, "CMYK").save(folder / "99.jpg", quality=95)
    pixels, subject = loaded(tiny_params, folder)
    assert np.abs(pixels[:, :40].astype(int) - (255, 0, 0)).max() <= 6
    assert np.abs(pixels[:, 56:].astype(int) - 127).max() <= 6
    assert subject.conversions[0]["conversion"] == "CMYK (CMYK) converted to RGB"


def test_link_out_of_the_subject_folder_is_refused(tiny_params, folder, tmp_path):
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(noise(9)).save(outside)
    (folder / "99.png").symlink_to(outside)
    refuse(tiny_params, folder, tmp_path, "99.png is a link to", "outside the subject folder")


def test_link_inside_the_subject_folder_is_read(tiny_params, folder):
    (folder / "99.png").symlink_to(folder / "00.png")
    pixels, subject = loaded(tiny_params, folder)
    assert (pixels == noise(0)).all() and "99.png is a duplicate of 00.png" in subject.warnings[0]


def test_copies_of_one_photo_do_not_count_towards_the_minimum(tiny_params, folder, tmp_path):
    """Issue 23 item 13: four identical photos passed the 3-photo minimum."""
    for i in (1, 2, 99):
        (folder / f"{i:02d}.png").unlink(missing_ok=True)
        shutil.copy(folder / "00.png", folder / f"{i:02d}.png")
    refuse(tiny_params, folder, tmp_path, "has 4 photos but only 1 different ones", "at least 3 different photos")


def test_a_subfolder_is_refused_not_ignored(tiny_params, folder, tmp_path):
    (folder / "more").mkdir()
    Image.fromarray(noise(5)).save(folder / "more" / "05.png")
    refuse(tiny_params, folder, tmp_path, "holds folders (more): photos inside them would not be read")


def test_an_animated_webp_is_refused_not_cut_to_its_first_frame(tiny_params, folder, tmp_path):
    frames = [Image.fromarray(noise(i)) for i in (7, 8)]
    frames[0].save(folder / "99.webp", save_all=True, append_images=frames[1:], duration=100)
    refuse(tiny_params, folder, tmp_path, "99.webp is animated (2 frames)")


def test_a_file_as_subject_folder_is_named_a_file(tiny_params, folder, tmp_path):
    refuse(tiny_params, folder / "00.png", tmp_path, "00.png is a file, not a folder")


@pytest.mark.parametrize("word", ["café", "кот", "stuffed animal"])
def test_class_words_of_any_script_are_letters(tiny_params, folder, tmp_path, word):
    out = refine(tiny_params, folder, word, tmp_path / "refine")
    assert json.loads((out / "subject.json").read_text())["class_word"] == word


@pytest.fixture
def decoded(monkeypatch):
    """The files whose pixels were decoded (ImageFile.load), to show that checks come first."""
    seen = []
    original = ImageFile.ImageFile.load

    def load(self):
        seen.append(getattr(self, "filename", None))
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return seen


def big_photo(path):
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (160, 200, 3), dtype=np.uint8)).save(path)


def test_oversized_file_is_refused_before_any_photo_is_decoded(tiny_params, folder, tmp_path, decoded):
    big_photo(folder / "99.png")
    size = (folder / "99.png").stat().st_size
    subject = tiny_params.subject.model_copy(update={"max_file_bytes": size - 1})
    params = tiny_params.model_copy(update={"subject": subject})
    refuse(params, folder, tmp_path, f"99.png is {size:,} bytes, above the limit of {size - 1:,}",
           "subject.max_file_bytes")
    assert decoded == []


def test_bomb_as_last_file_is_refused_before_any_photo_is_decoded(tiny_params, folder, tmp_path, decoded):
    big_photo(folder / "99.png")
    subject = tiny_params.subject.model_copy(update={"max_pixels": 200 * 160 - 1})
    params = tiny_params.model_copy(update={"subject": subject})
    refuse(params, folder, tmp_path, "99.png declares 200x160 = 32,000 pixels", "decompression bomb")
    assert decoded == []


def test_too_many_images_is_refused_before_any_photo_is_decoded(tiny_params, folder, tmp_path, decoded):
    for i in range(3, 21):
        Image.fromarray(noise(i)).save(folder / f"{i:02d}.png")
    refuse(tiny_params, folder, tmp_path, "has 21 images; at most 20")
    assert decoded == []
