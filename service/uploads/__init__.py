"""Validation of uploaded model files and image-set archives, before anything is stored.

Everything here is a pure function of a file that is already on local disk (Flask has spooled
the upload to a temporary file). The API process runs it, so it imports only the standard
library, Pillow, ``onnx`` and the torch-free :mod:`saliency_audit.workers.engine.image_files`: never
torch.
Nothing uploaded is unpickled, executed or extracted to disk. Every refusal is one
:class:`UploadRejected` carrying an HTTP status, a short code and a human-readable detail.

One module per format, each readable on its own:

=====================  ======================================================================
``model_files``        :func:`inspect_model`: which format a model file is (from its bytes),
                       and what every model must be (a classifier; weights name an
                       architecture)
``onnx_model``         ONNX protobuf: no external data, the ONNX checker, a classifier output
``safetensors_model``  safetensors: the JSON header parsed by hand, spans tiling the data
``torch_model``        ``torch.save`` zip archives: one bounded ``data.pkl``, storage records
``pickle_scan``        the static pickle scanner: tables of allowed opcodes and globals
``classifier_head``    a torchvision head and class count from weight shapes
``image_sets``         :func:`read_dataset_archive`: the image-set layout, two passes
``archives``           ZIP and tar members read under caps, never extracted
``images``             images, masks and ``boxes.json`` from bytes in memory
``common``             :class:`UploadRejected`, size units, safe names in messages
=====================  ======================================================================
"""

from __future__ import annotations

from .archives import ArchiveLimits
from .common import ModelInfo, UploadRejected
from .image_sets import DatasetManifest, ManifestImage, read_dataset_archive
from .model_files import (
    DEFAULT_MAX_MODEL_BYTES,
    TORCHVISION_CLASSIFIERS,
    check_architecture,
    inspect_model,
)
from .pickle_scan import ALLOWED_PICKLE_GLOBALS, PickleScan, scan_state_dict_pickle

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
