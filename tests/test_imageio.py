"""Loading every legal image kind correctly, refusing bad files clearly, saving atomically."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from nst.engine.errors import InputError
from nst.engine.imageio import check_output_path, load_image, save_image


def _rgb_array(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rgb_png_roundtrip(tmp_path):
    arr = _rgb_array()
    Image.fromarray(arr).save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png")
    assert t.shape == (3, 40, 60) and t.dtype == torch.float32
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy() * 255, arr, atol=1e-4)


def test_greyscale_and_palette(tmp_path):
    g = np.random.default_rng(1).integers(0, 256, size=(32, 48), dtype=np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    t = load_image(tmp_path / "g.png")
    assert t.shape == (3, 32, 48)
    for c in range(3):
        np.testing.assert_allclose(t[c].numpy() * 255, g, atol=1e-4)
    rgb = Image.fromarray(_rgb_array(32, 48, 2))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    t = load_image(tmp_path / "p.png")
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy() * 255, np.asarray(pal.convert("RGB")), atol=1e-4)


def test_rgba_composited_on_white(tmp_path):
    arr = np.zeros((32, 32, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red...
    arr[:16, :, 3] = 255  # ...opaque in the top half, transparent below
    arr[16:, :, 3] = 0
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png")
    assert torch.allclose(t[:, :16], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 16, 32))
    assert torch.allclose(t[:, 16:], torch.ones(3, 16, 32))  # white, not black


def test_16_bit_keeps_precision(tmp_path):
    arr = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    t = load_image(tmp_path / "g16.png")
    np.testing.assert_allclose(t[0].numpy(), arr / 65535.0, atol=1e-6)
    assert len(np.unique(t[0].numpy())) > 256  # more levels than 8 bits could hold


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    t = load_image(tmp_path / "c.jpg")
    assert t[0].mean() > 0.9 and t[1].mean() < 0.1 and t[2].mean() < 0.1


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.fromarray(_rgb_array(30, 50, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "o.jpg", exif=exif, quality=95)
    t = load_image(tmp_path / "o.jpg")
    assert t.shape == (3, 50, 30)


def test_multipage_uses_first_page(tmp_path, caplog):
    pages = [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    t = load_image(tmp_path / "m.tif")
    assert t[0].mean() > 0.99 and t[2].mean() < 0.01
    assert "using the first" in caplog.text


@pytest.mark.parametrize("case,message", [
    ("missing", "file not found"),
    ("directory", "is a directory"),
    ("empty", "file is empty"),
    ("text", "not an image file"),
    ("truncated", "truncated or corrupt"),
    ("bomb", "over the limit"),
    ("tiny", "too small"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, case, message):
    p = tmp_path / f"{case}.png"
    if case == "directory":
        p.mkdir()
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "text":
        p.write_text("hello, I am not a picture\n")
    elif case == "truncated":
        buf = io.BytesIO()
        Image.fromarray(_rgb_array(64, 64, 4)).save(buf, "JPEG")
        p = tmp_path / "t.jpg"
        p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif case == "bomb":
        Image.new("RGB", (300, 300)).save(p)
    elif case == "tiny":
        Image.new("RGB", (10, 10)).save(p)
    with pytest.raises(InputError) as e:
        load_image(p, max_pixels=50_000, min_side=32)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff"])
def test_save_formats(tmp_path, ext):
    x = torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(0))
    p = save_image(x, tmp_path / f"out{ext}")
    with Image.open(p) as im:
        assert im.size == (40, 24)
        fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}[ext]
        assert im.format == fmt
    assert [q.name for q in tmp_path.iterdir()] == [f"out{ext}"]  # no temporary file left


def test_unknown_output_extension_refused(tmp_path):
    with pytest.raises(InputError, match="unknown output extension .gif"):
        check_output_path(tmp_path / "x.gif")
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(tmp_path / "nodir" / "x.png")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, fp, format=None, **kw):
        with open(fp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    # An OSError while writing becomes one clear error (an InputError: the path is the user's).
    with pytest.raises(InputError, match=r"cannot write .*o\.png: disk full"):
        save_image(torch.rand(3, 8, 8), tmp_path / "o.png")
    assert list(tmp_path.iterdir()) == []


def test_shared_bad_examples_when_present():
    """The real files in ../shared/images/bad (if this checkout has them) load or fail cleanly."""
    from pathlib import Path

    bad = Path(__file__).resolve().parents[2] / "shared" / "images" / "bad"
    if not bad.is_dir():
        pytest.skip("../shared/images/bad is not beside this checkout")
    outcomes = {}
    for p in sorted(bad.iterdir()):
        try:
            outcomes[p.name] = tuple(load_image(p, min_side=32).shape)
        except InputError as e:
            outcomes[p.name] = str(e)
    assert outcomes["chessboard_GRAY.png"] == (3, 200, 200)
    assert outcomes["chessboard_GRAY_U16.tif"] == (3, 200, 200)
    assert outcomes["green_palette.png"] == (3, 240, 320)
    assert "truncated or corrupt" in outcomes["truncated.jpg"]
    assert "too small" in outcomes["foo3x5x4indexed.png"]
    # 10x10 pages with an unusual bit layout: Pillow cannot decode it; either way, one clear line.
    assert "too small" in outcomes["multipage_rgb.tif"] or "cannot read" in outcomes["multipage_rgb.tif"]
