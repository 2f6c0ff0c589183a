"""The digits data set (sklearn ``load_digits``) as image tensors for the generators and judges."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor


def load_digit_images(image_size: int = 8) -> tuple[Tensor, Tensor]:
    """1797 grey digits as (N, 1, S, S) floats in [−1, 1] (x/8 − 1 of the 0..16 values) and (N,) labels.

    S = 8 is the native size; any other S resizes bilinearly.
    """
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.long)
