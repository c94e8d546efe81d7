"""The embedded default model: a small byte-level Llama trained by `train.py` in this folder.

It ships inside the package so the demo, the devnet and the tests never need a download.
"""

from pathlib import Path

EMBEDDED_MODEL = Path(__file__).resolve().parent / "model"

__all__ = ["EMBEDDED_MODEL"]
