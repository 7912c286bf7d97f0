"""Input normalisation: the one home of the mean/std constants and of the normalise op.

Both models take images in ``[0, 1]`` and normalise inside, with their own mean/std (stored in
their description, so checkpoints restore it):

* :class:`~mnv3det.models.ssdlite.SSDLite`: ``SSDLITE_MEAN`` / ``SSDLITE_STD`` (0.5, i.e. to
  ``[-1, 1]``), torchvision's ``ssdlite320_mobilenet_v3_large``;
* :class:`~mnv3det.models.lraspp.LRASPP`: ``IMAGENET_MEAN`` / ``IMAGENET_STD``, what torchvision's
  ``lraspp_mobilenet_v3_large`` and the ImageNet backbone weights expect.

Everything that feeds a backbone directly (fast inference, export, benchmarks) uses
:class:`Normalize` or these constants rather than its own copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
SSDLITE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SSDLITE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


class Normalize(nn.Module):
    """``(images - mean) / std`` per channel, for RGB images in ``[0, 1]``.

    The statistics are non-persistent buffers (not in the ``state_dict``: a model's description
    carries them), shaped ``(3, 1, 1)`` so one ``(3, H, W)`` image and an ``(N, 3, H, W)`` batch
    both broadcast. They are cast to the images' dtype and device, so half-precision input stays
    half.

    Args:
        mean: per-channel mean.
        std: per-channel standard deviation (no zeros).

    Raises:
        ValueError: ``mean``/``std`` do not have one value per channel, or ``std`` has a zero.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or any(float(s) == 0 for s in std):
            raise ValueError(
                f"normalisation needs 3 means and 3 non-zero stds, got mean={list(mean)}, "
                f"std={list(std)}"
            )
        self.register_buffer("mean", _column(mean), persistent=False)
        self.register_buffer("std", _column(std), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Normalise ``(3, H, W)`` or ``(N, 3, H, W)`` images in ``[0, 1]``."""
        return (images - self.mean.to(images)) / self.std.to(images)

    @property
    def description(self) -> dict[str, list[float]]:
        """``{"image_mean": [...], "image_std": [...]}``: the models' description entries and
        builder arguments (``ssdlite``/``lraspp(image_mean=..., image_std=...)``)."""
        return {
            "image_mean": [float(v) for v in self.mean.flatten()],
            "image_std": [float(v) for v in self.std.flatten()],
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.description.items())


def _column(values: Sequence[float]) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32).view(3, 1, 1)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SSDLITE_MEAN", "SSDLITE_STD", "Normalize"]
