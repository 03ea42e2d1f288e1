"""``image``: image classification from ``DIR/{train,val}/CLASS/*.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..data import DataError, ImageFolderDataset, vit_image_processor
from ..models import resolve
from .base import TaskArgs, TaskSetup, seeded_subset


def _image_processor(path: str, config: Any, trust_remote_code: bool):
    from transformers import AutoImageProcessor

    try:
        # the PIL backend: torchvision is not usable in deft's environments
        return AutoImageProcessor.from_pretrained(path, backend="pil", trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        # a checkpoint without preprocessor_config.json (e.g. a config-only or tiny test model)
        return vit_image_processor(int(getattr(config, "image_size", 224)))


def _accuracy(p: Any) -> dict[str, float]:
    import numpy as np
    from sklearn.metrics import accuracy_score

    logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
    return {"accuracy": float(accuracy_score(np.asarray(p.label_ids).reshape(-1), np.argmax(logits, axis=-1)))}


def setup(args: TaskArgs) -> TaskSetup:
    """image: classification from ``DIR/{train,val}/CLASS/*.png``."""
    from torch.utils.data import Subset
    from transformers import AutoConfig, AutoModelForImageClassification, default_data_collator

    if not args.data_dir:
        raise DataError("--task image needs --data-dir DIR with DIR/train/CLASS/*.png and DIR/val/CLASS/*.png")
    root, path = Path(args.data_dir), resolve(args.model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    processor = _image_processor(path, config, args.trust_remote_code)
    train, val = ImageFolderDataset(root / "train", processor), ImageFolderDataset(root / "val", processor)
    if train.classes != val.classes:
        raise DataError(f"{root}/train and {root}/val have different class folders: {train.classes} vs {val.classes}")
    config.num_labels = len(train.classes)
    config.id2label = dict(enumerate(train.classes))
    config.label2id = dict(train.class_to_idx)
    # ignore_mismatched_sizes: a pretrained head (e.g. ImageNet's 1000 classes) is replaced by a fresh one
    model = AutoModelForImageClassification.from_pretrained(
        path, config=config, ignore_mismatched_sizes=True, trust_remote_code=args.trust_remote_code
    )

    def subset(ds: ImageFolderDataset, n: int | None, seed: int) -> Dataset:
        idx = seeded_subset(list(range(len(ds))), n, seed)
        return ds if len(idx) == len(ds) else Subset(ds, idx)

    return TaskSetup(
        task="image",
        task_type="IMAGE_CLS",
        model=model,
        tokenizer_or_processor=processor,
        train_dataset=subset(train, args.max_train_samples, args.seed),
        eval_dataset=subset(val, args.max_eval_samples, 0),
        data_collator=default_data_collator,
        compute_metrics=_accuracy,
        evaluate_fn=None,
        main_metric="accuracy",
        data_label=f"image folders {root}/train and {root}/val ({len(train.classes)} classes: "
        f"{', '.join(train.classes)})",
        details={"family": "image", "classes": train.classes},
    )
