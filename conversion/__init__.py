"""Conversion of DeepLabCut 3 SuperAnimal PyTorch checkpoints to ONNX models with posezoo cards.

Needs the ``conversion`` extra (PyTorch, torchvision, timm, DeepLabCut, onnx):
``pip install 'posezoo[conversion]'``. Command line: ``python -m conversion --help``.
"""
