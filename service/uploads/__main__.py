"""``python -m service.uploads PATH FILENAME SIZE OUTPUT``: the ONNX check in a child process."""

import sys

from .image_sets import _check_in_child

sys.exit(_check_in_child(sys.argv[1:]))
