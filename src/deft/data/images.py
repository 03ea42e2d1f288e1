"""Image classification data for ViT-type models, without torchvision.

torchvision is not usable in deft's environments, so images are read with PIL and turned into
``pixel_values`` by a transformers image processor (resize + rescale + normalise), which is all a
ViT classifier needs.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from deft.data.errors import DataError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def vit_image_processor(size: int = 224) -> Any:
    """A ViT image processor built from arguments (nothing downloaded), ImageNet-style 0.5 mean/std."""
    import transformers

    # The PIL backend directly: ViTImageProcessor would look for torchvision first and warn.
    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return cls(size={"height": size, "width": size})


class ImageFolderDataset(Dataset):
    """Images laid out as ``root/CLASS_NAME/*.png|jpg|jpeg``; class ids follow sorted class names.

    Hidden files (``.DS_Store`` and the like) are skipped; any other non-image file is an error
    rather than silently ignored, since it usually means a wrong ``root``.
    """

    def __init__(self, root: str | PathLike[str], image_processor: Any) -> None:
        self.root = Path(root)
        self.image_processor = image_processor
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder (expected root/CLASS_NAME/*.png)")
        entries = sorted(p for p in self.root.iterdir() if not p.name.startswith("."))
        stray = [p for p in entries if not p.is_dir()]
        if stray:
            raise DataError(f"{stray[0]}: a file directly under the image root; images go in root/CLASS_NAME/")
        self.classes: list[str] = [p.name for p in entries]
        if not self.classes:
            raise DataError(f"{self.root}: no class folders (expected root/CLASS_NAME/*.png)")
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for name in self.classes:
            for path in sorted((self.root / name).iterdir()):
                if path.name.startswith("."):
                    continue
                if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                    raise DataError(f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
                self.samples.append((path, self.class_to_idx[name]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")  # grey / RGBA / palette PNGs all become 3 channels
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: cannot read image ({e})") from e
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels.float(), "labels": torch.tensor(label, dtype=torch.long)}


def make_synthetic_images(
    root: str | PathLike[str],
    n_per_class: int,
    classes: Sequence[str] = ("red", "green", "blue"),
    size: int = 16,
    seed: int = 0,
) -> Path:
    """Write ``root/CLASS/NNNN.png`` images a tiny model can learn: the class sets the hue.

    Each class gets its own hue (evenly spaced around the colour wheel); per-pixel noise makes every
    image different, so a model must learn the colour rather than memorise pixels. Returns ``root``.
    """
    if n_per_class < 1 or not classes:
        raise DataError(f"n_per_class={n_per_class} and classes={list(classes)} must both be non-empty")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        base = 255 * np.array(colorsys.hsv_to_rgb(c / len(classes), 0.8, 0.8))
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(n_per_class):
            noise = rng.normal(0.0, 20.0, size=(size, size, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="RGB").save(folder / f"{j:04d}.png")
    return root
