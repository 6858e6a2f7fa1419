"""Thumbnails of training examples and queries for the HTML page: small PNGs inlined as ``data:`` URIs.

numpy and matplotlib (the ``report`` extra) are imported when a thumbnail is made, so that ``import hookinf`` needs
neither.
"""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING, Any

from torch import Tensor

from hookinf.errors import ConfigurationError
from hookinf.report.page import escape

if TYPE_CHECKING:
    import numpy.typing as npt

_THUMB_MAX = 64  # thumbnails are subsampled to at most this many pixels a side


def thumbnail(image: Tensor | npt.NDArray[Any]) -> str:
    """A ``data:image/png;base64,...`` URI of an image, subsampled to at most 64 pixels a side.

    Args:
        image: ``[H, W]`` (grey), ``[H, W, C]`` or ``[C, H, W]`` with ``C`` in 1, 3, 4; float or integer. A grey
            image in ``[0, 1]`` (float) or ``[0, 255]`` (uint8) is shown on that scale, other grey images are
            scaled from their minimum to their maximum; float colour images are clipped to ``[0, 1]``.

    Returns:
        The data URI.

    Raises:
        ConfigurationError: the array has another shape or holds NaN / infinity.
    """
    return _png_uri(_image_array(image))


def _image_array(image: Tensor | npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The image as a checked ``[H, W]`` or ``[H, W, 3|4]`` numpy array."""
    import numpy as np

    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # [C, H, W] → [H, W, C]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise ConfigurationError(
            f"images(...) returned shape {list(arr.shape)}; an image must be [H, W], [H, W, C] or [C, H, W] with "
            f"C in 1, 3, 4."
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float64)
    if not np.issubdtype(arr.dtype, np.number) or (
        np.issubdtype(arr.dtype, np.floating) and not bool(np.isfinite(arr).all())
    ):
        raise ConfigurationError(f"images(...) returned {arr.dtype} values with NaN/infinity or non-numbers.")
    return arr


def _png_uri(arr: npt.NDArray[Any]) -> str:
    """A PNG data URI of a checked image array, subsampled to at most ``_THUMB_MAX`` pixels a side."""
    import numpy as np
    from matplotlib.image import imsave

    step = math.ceil(max(arr.shape[:2]) / _THUMB_MAX)
    arr = arr[::step, ::step]
    buf = io.BytesIO()
    if arr.ndim == 2:
        lo, hi = float(arr.min()), float(arr.max())
        if arr.dtype == np.uint8:
            lo, hi = 0.0, 255.0
        elif lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        imsave(buf, arr.astype(np.float64), format="png", cmap="gray", vmin=lo, vmax=hi)
    else:
        if arr.dtype != np.uint8:
            arr = np.clip(arr.astype(np.float64), 0.0, 1.0)
        imsave(buf, arr, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(image: Tensor | npt.NDArray[Any], alt: str) -> str:
    """An ``<img>`` of the image's thumbnail (:func:`thumbnail`), with the alternative text ``alt`` (escaped)."""
    arr = _image_array(image)
    css = "thumb pixelated" if max(arr.shape[:2]) < 32 else "thumb"  # blocky pixels for tiny images, not blur
    return f'<img class="{css}" alt="{escape(alt)}" src="{_png_uri(arr)}">'
