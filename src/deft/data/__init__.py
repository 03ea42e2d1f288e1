"""Task data for deft: GLUE, SQuAD v1.1 and image folders, with their metrics.

Every loader raises :class:`DataError` with the file and line (or the option) at fault.
"""

from deft.data.errors import DataError
from deft.data.glue import (
    GLUE_TASKS,
    Example,
    GlueDataset,
    GlueTask,
    glue_metrics,
    glue_task,
    load_glue,
    read_glue_tsv,
)
from deft.data.images import IMAGE_SUFFIXES, ImageFolderDataset, make_synthetic_images, vit_image_processor
from deft.data.squad import (
    EXTRACTIVE_META_KEYS,
    QAExample,
    generative_pairs,
    load_squad,
    postprocess_extractive,
    prepare_extractive_eval,
    prepare_extractive_train,
    split_squad,
    squad_metrics,
)

__all__ = [
    "DataError",
    "EXTRACTIVE_META_KEYS",
    "Example",
    "GLUE_TASKS",
    "GlueDataset",
    "GlueTask",
    "IMAGE_SUFFIXES",
    "ImageFolderDataset",
    "QAExample",
    "generative_pairs",
    "glue_metrics",
    "glue_task",
    "load_glue",
    "load_squad",
    "make_synthetic_images",
    "postprocess_extractive",
    "prepare_extractive_eval",
    "prepare_extractive_train",
    "read_glue_tsv",
    "split_squad",
    "squad_metrics",
    "vit_image_processor",
]
