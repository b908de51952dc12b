"""``python -m saliency_audit.service.uploads PATH FILENAME SIZE OUTPUT``: the ONNX check in a child
process."""

import sys

from .onnx_model import check_in_child

sys.exit(check_in_child(sys.argv[1:]))
