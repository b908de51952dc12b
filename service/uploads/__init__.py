"""Validation of uploaded model files and image-set archives, before anything is stored."""

from __future__ import annotations

from .image_sets import (
    ALLOWED_PICKLE_GLOBALS,
    DEFAULT_MAX_MODEL_BYTES,
    TORCHVISION_CLASSIFIERS,
    ArchiveLimits,
    DatasetManifest,
    ManifestImage,
    ModelInfo,
    PickleScan,
    UploadRejected,
    check_architecture,
    inspect_model,
    read_dataset_archive,
    scan_state_dict_pickle,
)

__all__ = [
    "ALLOWED_PICKLE_GLOBALS",
    "DEFAULT_MAX_MODEL_BYTES",
    "TORCHVISION_CLASSIFIERS",
    "ArchiveLimits",
    "DatasetManifest",
    "ManifestImage",
    "ModelInfo",
    "PickleScan",
    "UploadRejected",
    "check_architecture",
    "inspect_model",
    "read_dataset_archive",
    "scan_state_dict_pickle",
]
