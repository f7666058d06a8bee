"""Every bad subject input fails with a message naming the problem and the fix, and writes nothing."""

import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from subjectops.errors import SubjectError
from subjectops.stages.common import partial_dir
from subjectops.stages.refine import refine


def photo(path, size=(96, 80), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def subject(tmp_path):
    d = tmp_path / "my_toy"
    d.mkdir()
    for i in range(4):
        photo(d / f"{i:02d}.jpg", seed=i)
    return d


def run_refine(params, subject_dir, tmp_path, class_word="toy"):
    out = tmp_path / "run" / "refine"
    try:
        return refine(params, subject_dir, class_word, out)
    finally:
        pass


def assert_nothing_written(tmp_path):
    out = tmp_path / "run" / "refine"
    assert not out.exists() and not partial_dir(out).exists()


def test_valid_subject_is_normalized(tiny_params, subject, tmp_path):
    out = run_refine(tiny_params, subject, tmp_path)
    images = sorted((out / "images").glob("*.png"))
    masks = sorted((out / "masks").glob("*.png"))
    assert len(images) == len(masks) == 4
    for img, mask in zip(images, masks):
        assert Image.open(img).size == (64, 64) and Image.open(img).mode == "RGB"
        assert Image.open(mask).size == (64, 64) and Image.open(mask).mode == "L"
    assert (out / "manifest.json").exists() and not partial_dir(out).exists()


def test_exif_orientation_is_applied(tiny_params, tmp_path):
    d = tmp_path / "rotated"
    d.mkdir()
    for i in range(3):
        photo(d / f"{i}.png", size=(128, 96), seed=i)
    # A portrait photo stored landscape with EXIF orientation 6 (rotate 90 degrees clockwise to display).
    arr = np.zeros((96, 200, 3), np.uint8)
    arr[:, :100] = 255  # left half white: after rotating, the top half is white
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(d / "3.jpg", exif=exif.tobytes(), quality=95)
    out = refine(tiny_params.model_copy(update={"subject": tiny_params.subject.model_copy(update={"fit": "pad"})}),
                 d, "toy", tmp_path / "r" / "refine")
    img = np.asarray(Image.open(out / "images" / "03.png")).astype(float)
    top, bottom = img[:20, 20:44].mean(), img[44:, 20:44].mean()
    assert top > 200 and bottom < 60, (top, bottom)


@pytest.mark.parametrize("count", [0, 2])
def test_too_few_images(tiny_params, tmp_path, count):
    d = tmp_path / "few"
    d.mkdir()
    for i in range(count):
        photo(d / f"{i}.jpg", seed=i)
    with pytest.raises(SubjectError) as err:
        run_refine(tiny_params, d, tmp_path)
    assert f"has {count} image(s); at least 3" in str(err.value) and "add photos" in str(err.value)
    assert_nothing_written(tmp_path)


def test_corrupt_image(tiny_params, subject, tmp_path):
    data = (subject / "01.jpg").read_bytes()
    (subject / "01.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(SubjectError) as err:
        run_refine(tiny_params, subject, tmp_path)
    assert "01.jpg is not a readable image" in str(err.value) and "re-export" in str(err.value)
    assert_nothing_written(tmp_path)


def test_zero_byte_file(tiny_params, subject, tmp_path):
    (subject / "04.png").write_bytes(b"")
    with pytest.raises(SubjectError) as err:
        run_refine(tiny_params, subject, tmp_path)
    assert "04.png is an empty (zero-byte) file" in str(err.value)
    assert_nothing_written(tmp_path)


def test_non_image_file(tiny_params, subject, tmp_path):
    (subject / "notes.txt").write_text("shot on my phone")
    with pytest.raises(SubjectError) as err:
        run_refine(tiny_params, subject, tmp_path)
    assert "not images: notes.txt" in str(err.value) and "keep only photos" in str(err.value)
    assert_nothing_written(tmp_path)


def test_text_file_with_image_suffix(tiny_params, subject, tmp_path):
    (subject / "05.png").write_text("not really a png")
    with pytest.raises(SubjectError, match="05.png is not a readable image"):
        run_refine(tiny_params, subject, tmp_path)
    assert_nothing_written(tmp_path)


def test_image_below_resolution(tiny_params, subject, tmp_path):
    photo(subject / "02.jpg", size=(48, 40))
    with pytest.raises(SubjectError) as err:
        run_refine(tiny_params, subject, tmp_path)
    assert "02.jpg is 48x40, below the training resolution 64 px" in str(err.value)
    assert "subject.resolution" in str(err.value)
    assert_nothing_written(tmp_path)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size; Pillow reads the header without decoding pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND",
                                                                                                             b"")


def test_decompression_bomb(tiny_params, subject, tmp_path):
    (subject / "bomb.png").write_bytes(png_header_only(40000, 40000))
    with pytest.raises(SubjectError) as err:
        run_refine(tiny_params, subject, tmp_path)
    assert "40000x40000" in str(err.value) and "decompression bomb" in str(err.value)
    assert_nothing_written(tmp_path)


def test_duplicate_images_warn(tiny_params, subject, tmp_path, capsys):
    shutil.copy(subject / "00.jpg", subject / "05.jpg")
    out = run_refine(tiny_params, subject, tmp_path)
    import json

    # said, not a raw UserWarning
    assert "refine: 05.jpg is a duplicate of 00.jpg" in " ".join(capsys.readouterr().err.split())
    assert any("duplicate" in w for w in json.loads((out / "subject.json").read_text())["warnings"])


@pytest.mark.parametrize("word", ["", "   ", None])
def test_empty_class_word(tiny_params, subject, tmp_path, word):
    with pytest.raises(SubjectError, match="class word is empty"):
        run_refine(tiny_params, subject, tmp_path, class_word=word)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("name", ["my toy", "-rm", "toy;ls"])
def test_unsafe_subject_name(tiny_params, subject, tmp_path, name):
    bad = subject.rename(subject.parent / name)
    with pytest.raises(SubjectError) as err:
        run_refine(tiny_params, bad, tmp_path)
    assert "not a safe path component" in str(err.value)
    assert_nothing_written(tmp_path)


def test_failed_rerun_keeps_earlier_output(tiny_params, subject, tmp_path):
    out = run_refine(tiny_params, subject, tmp_path)
    before = (out / "manifest.json").read_text()
    (subject / "00.jpg").write_bytes(b"")
    with pytest.raises(SubjectError):
        run_refine(tiny_params, subject, tmp_path)
    assert (out / "manifest.json").read_text() == before


def test_cli_prints_error_and_fix(tmp_path, example_subject):
    from typer.testing import CliRunner

    from subjectops.cli import app

    d = tmp_path / "two"
    d.mkdir()
    for f in sorted(example_subject.glob("*.jpg"))[:2]:
        shutil.copy(f, d)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(d), "--class", "teapot", "--out", str(out), "--model", "tiny-sd15"])
    assert result.exit_code == 2
    assert "error:" in result.output and "has 2 image(s)" in result.output and "fix:" in result.output
    assert not out.exists()


def test_sam_backend_without_checkpoint_names_the_fix(tiny_params, subject, tmp_path):
    from subjectops.errors import ModelNotFoundError

    params = tiny_params.model_copy(update={"refine": tiny_params.refine.model_copy(
        update={"mask_backend": "sam", "sam_checkpoint": str(tmp_path / "sam_vit_b.pth")})})
    with pytest.raises(ModelNotFoundError) as err:
        run_refine(params, subject, tmp_path)
    assert "SAM checkpoint" in str(err.value) and "refine.sam_checkpoint" in str(err.value)
    assert "mask_backend=grabcut" in str(err.value)
    assert_nothing_written(tmp_path)


def test_grabcut_segments_one_photo_per_core_into_the_masks_it_makes_alone(example_subject):
    import threading

    from subjectops.config import RefineCfg
    from subjectops.segment import segment_all
    from subjectops.segment.grabcut import GrabCutBackend
    from subjectops.threads import cpus

    backend = GrabCutBackend(RefineCfg())
    photos = [Image.open(p).convert("RGB").resize((256, 256)) for p in sorted(example_subject.glob("*.jpg"))]
    alone = [np.asarray(backend.mask(p)) for p in photos]
    threads = set()
    segment = backend.mask
    backend.mask = lambda image: threads.add(threading.get_ident()) or segment(image)
    together = [np.asarray(m) for m in segment_all(backend, photos)]
    assert len(together) == len(photos) >= 4
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))  # same masks, same order
    # photos of 0.1 s each: every CPU the quota and affinity give takes some (subjectops.threads.cpus)
    assert len(threads) > 1 or cpus() == 1
