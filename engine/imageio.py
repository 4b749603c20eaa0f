"""Image files in and out: load (any mode PIL reads), validate, resize, save atomically.

Kept out of the numerical core: everything here speaks PIL and paths, and hands the core
float tensors of shape (3, H, W) with values in [0, 1].
"""

from __future__ import annotations

import io
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .fsutil import atomic_path, write_target
from .sizes import MAX_PIXELS, fit_long_edge

log = logging.getLogger("nst")

# Output formats by extension; anything else is refused before any work.
SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output path we could not write, before any work is done."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in SAVE_FORMATS:
        shown = ext or "(none)"
        raise InputError(
            f"unknown output extension {shown} for {path}; use one of {', '.join(sorted(set(SAVE_FORMATS)))}"
        )
    return write_target(path, "output")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, what: str = "image", min_side: int = 1) -> torch.Tensor:
    """Read an image file as a float32 tensor (3, H, W), RGB in [0, 1].

    Honours EXIF orientation; greyscale, palette, 16-bit, CMYK and alpha images load as
    RGB (alpha is composited on white). Every failure is one clear InputError.
    """
    path = Path(path)
    label = f"{what} {path}"
    if not path.exists():
        if path.is_symlink():
            raise InputError(f"{label}: a symlink that leads nowhere (broken, or a loop)")
        raise InputError(f"{label}: file not found")
    if path.is_dir():
        raise InputError(f"{label}: is a directory, not an image file")
    if path.stat().st_size == 0:
        raise InputError(f"{label}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > max_pixels:
                raise InputError(
                    f"{label}: {w}x{h} is {w * h:,} pixels, over the limit of {max_pixels:,} (--max-pixels; a "
                    "decompression bomb?)"
                )
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1:
                log.warning("%s has %d pages/frames; using the first", label, n_frames)
            img.load()
            img = ImageOps.exif_transpose(img)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{label}: too many pixels (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise InputError(f"{label}: not an image file, or a format Pillow cannot read") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{label}: cannot decode ({msg}); the file may be truncated or corrupt") from None
    w, h = img.size
    if min(w, h) < min_side:
        raise InputError(f"{label}: {w}x{h} px is too small; the network needs at least {min_side} px per side")
    return pil_to_tensor(img)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Any PIL mode -> float32 (3, H, W) in [0, 1]."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) greyscale: keep the precision instead of clipping to 8 bits.
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top, 0.0, 1.0).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0).repeat(3, 1, 1)
    if mode == "F":
        arr = np.asarray(img).astype(np.float32)
        top = 1.0 if arr.max(initial=0) <= 1.0 else (255.0 if arr.max() <= 255 else 65535.0)
        arr = np.clip(arr / top, 0.0, 1.0)
        return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0).repeat(3, 1, 1)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode != "RGB":
        img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV...
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) in [0, 1] -> 8-bit RGB PIL image (rounded, clamped)."""
    if x.dim() == 4:
        x = x[0]
    arr = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def save_image(x: torch.Tensor | Image.Image, path: str | os.PathLike, quality: int = 95) -> Path:
    """Write atomically (temporary file, then rename) in the format of the extension."""
    path = check_output_path(path)
    img = x if isinstance(x, Image.Image) else tensor_to_pil(x)
    fmt = SAVE_FORMATS[path.suffix.lower()]
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **kwargs)
    return path


def predict_save_s(sample: torch.Tensor, hw: tuple[int, int], path: str | os.PathLike) -> float:
    """Seconds that ``save_image`` will take to write an (H, W) = ``hw`` image to ``path``,
    predicted by encoding ``sample`` (3, h, w) at 256 px in the same format, in memory, and
    scaling by the pixel count; doubled, since a stylised image is busier than most photos
    and compresses more slowly, and with 0.1 s for the file itself."""
    fmt = SAVE_FORMATS[Path(path).suffix.lower()]
    small = resize_to(sample.float(), fit_long_edge(tuple(sample.shape[-2:]), 256))
    t0 = time.perf_counter()
    img = tensor_to_pil(small)
    img.save(io.BytesIO(), format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    per_pixel = (time.perf_counter() - t0) / (img.width * img.height)
    return 2.0 * per_pixel * hw[0] * hw[1] + 0.1


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (3, H, W) or (N, 3, H, W) to (height, width), antialiased (bicubic), clamped."""
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 1)
    return x[0] if squeeze else x


GIF_LONG_EDGE = 512  # frames are scaled down to this long edge: a GIF of full 2048 px frames is unwieldy


def check_gif_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise InputError(f"--gif {path}: the file name must end in .gif")
    return write_target(path, "--gif")


def gif_frame(x: torch.Tensor, hw: tuple[int, int]) -> Image.Image:
    """One GIF frame: (3, h, w) in [0, 1] resized to ``hw`` (every frame of a GIF has one size)."""
    return tensor_to_pil(resize_to(x.float(), hw))


def save_gif(frames: list[Image.Image], path: str | os.PathLike, duration_ms: int = 100) -> Path:
    """Write an animated GIF (it loops; the last frame shows for 2 s)."""
    path = check_gif_path(path)
    if not frames:
        raise InputError(f"--gif {path}: no frames were recorded")
    durations = [duration_ms] * (len(frames) - 1) + [2000]
    with atomic_path(path, suffix=".gif") as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0,
                       optimize=False)
    return path
