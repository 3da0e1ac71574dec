"""Data that ships with the package's dependencies: nothing is downloaded."""

from __future__ import annotations

import torch


def load_digits(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, UCI), scaled to [-1, 1].

    Args:
        size: side length; other than 8 the images are resized bilinearly.

    Returns:
        ``(images [1797, 1, size, size] float32, labels [1797] int64)``.
    """
    from sklearn.datasets import load_digits as _sklearn_digits

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    digits = _sklearn_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0 * 2.0 - 1.0
    if size != 8:
        images = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False
        ).clamp(-1, 1)
    return images, torch.from_numpy(digits.target).long()
