"""``python -m onnxcam``: the same as the ``onnxcam`` command."""

from onnxcam.cli import main

main()
