import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import png_header_only
from PIL import Image

from edge.errors import InputError, TooLargeError
from edge.media.images import load_image

DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"  # pydicom's own samples, offline


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_png_modes_become_rgb8():
    rng = np.random.RandomState(0)
    cases = {
        "RGB": Image.fromarray((rng.rand(17, 31, 3) * 255).astype("uint8")),
        "L": Image.fromarray((rng.rand(9, 5) * 255).astype("uint8")),
        "I;16": Image.fromarray((rng.rand(20, 10) * 4095).astype("uint16")),
        "RGBA": Image.fromarray((rng.rand(8, 8, 4) * 255).astype("uint8"), "RGBA"),
        "P": Image.fromarray((rng.rand(8, 8, 3) * 255).astype("uint8")).convert("P"),
    }
    for mode, img in cases.items():
        li = load_image(_png(img))
        assert li.image.mode == "RGB" and li.size == img.size and li.format == "png", mode
    sixteen = np.asarray(load_image(_png(cases["I;16"])).image)
    assert sixteen.min() == 0 and sixteen.max() == 255  # stretched over its range, not clipped at 255


def test_same_bytes_same_key_and_jpeg_exif_orientation():
    img = Image.fromarray((np.random.RandomState(1).rand(10, 20, 3) * 255).astype("uint8"))
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    img.save(buf, format="JPEG", exif=exif)
    a, b = load_image(buf.getvalue()), load_image(buf.getvalue())
    assert a.key == b.key and a.format == "jpeg"
    assert a.size == (10, 20) and a.source_size == (20, 10)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("patient notes, not an image")
    with pytest.raises(InputError, match="not an image"):
        load_image(p)
    with pytest.raises(InputError, match="empty"):
        load_image(b"")
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_truncated_png():
    data = _png(Image.fromarray((np.random.RandomState(2).rand(64, 64, 3) * 255).astype("uint8")))
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_huge_header_refused_before_decoding():
    with pytest.raises(TooLargeError, match="2500000000 pixels"):
        load_image(png_header_only(50000, 50000))
    with pytest.raises(TooLargeError, match="9000x9000 is 81 megapixels"):  # under Pillow's guard, over ours
        load_image(png_header_only(9000, 9000))


def test_file_size_limit(tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(_png(Image.fromarray((np.random.RandomState(3).rand(64, 64, 3) * 255).astype("uint8"))))
    with pytest.raises(TooLargeError, match="image limit"):
        load_image(p, max_bytes=100)


def test_dicom_window_from_file_and_default():
    mr = load_image(DICOM_DIR / "MR_small.dcm")
    assert mr.format == "dicom" and mr.info["window"]["from"] == "file" and mr.info["modality"] == "MR"
    ct = load_image(DICOM_DIR / "CT_small.dcm")  # no window in the file: percentile default
    assert ct.info["window"]["from"].startswith("percentile")
    a = np.asarray(ct.image)
    assert a.std() > 20  # a usable picture, not a flat one


def test_dicom_compressed_decoded_or_refused_by_name():
    rle = load_image(DICOM_DIR / "MR_small_RLE.dcm")
    assert np.array_equal(np.asarray(rle.image), np.asarray(load_image(DICOM_DIR / "MR_small.dcm").image))
    assert load_image(DICOM_DIR / "MR_small_jp2klossless.dcm").size == (64, 64)
    # JPEG-LS decodes with pyjpegls (which highdicom, in the reports extra, brings); JPEG Lossless
    # process 14 has no decoder here and is refused naming its transfer syntax
    jls = load_image(DICOM_DIR / "MR_small_jpeg_ls_lossless.dcm")
    assert np.array_equal(np.asarray(jls.image), np.asarray(load_image(DICOM_DIR / "MR_small.dcm").image))
    with pytest.raises(InputError, match="JPEG Lossless, Non-Hierarchical"):
        load_image(DICOM_DIR / "SC_rgb_jpeg_gdcm.dcm")


def test_dicom_without_pixels_and_truncated():
    with pytest.raises(InputError, match="no pixel data"):
        load_image(DICOM_DIR / "rtplan.dcm")
    with pytest.raises(InputError, match="truncated"):
        load_image(DICOM_DIR / "MR_truncated.dcm")


def test_dicom_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(DICOM_DIR / "MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    p = tmp_path / "mono1.dcm"
    ds.save_as(p)
    normal = np.asarray(load_image(DICOM_DIR / "MR_small.dcm").image).astype(int)
    inverted = np.asarray(load_image(p).image).astype(int)
    assert np.array_equal(inverted, 255 - normal)


def test_dicom_multiframe_frame_choice():
    path = DICOM_DIR / "examples_ybr_color.dcm"  # 30 frames, JPEG baseline YBR
    default = load_image(path)
    assert default.info["frames"] == 30 and default.info["frame"] == 15
    first = load_image(path, frame=0)
    assert first.key != default.key  # the cache key includes the frame
    with pytest.raises(InputError, match="frame 30 does not exist"):
        load_image(path, frame=30)


def test_dicom_colour():
    pal = load_image(DICOM_DIR / "examples_palette.dcm")
    assert pal.image.mode == "RGB" and pal.size == (800, 350)
