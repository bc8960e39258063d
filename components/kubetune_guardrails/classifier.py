"""A Hugging Face sequence-classification model as a guard's scorer (injection, moderation).

torch and transformers are imported when a classifier is loaded, so guards without one stay light.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def local_path(uri: str, pvc_root: str = "/mnt/pvc") -> Path:
    """A classifier's directory: a plain path, file:// URI, or pvc://claim/path mounted under pvc_root."""
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if uri.startswith("pvc://"):
        return Path(pvc_root) / uri[len("pvc://") :]
    if "://" in uri:
        raise ValueError(f"{uri!r}: a guard classifier must be a local path, file:// or pvc:// URI")
    return Path(uri)


class SequenceClassifier:
    """Probabilities per label (config.id2label) of one text, on CPU, without gradients."""

    def __init__(self, uri: str, max_length: int = 512, positive_label: str | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = local_path(uri)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{uri}: no config.json of a sequence-classification model at {path}")
        self._torch = torch
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.model: Any = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.max_length = max_length
        labels: Mapping[int, str] = self.model.config.id2label
        self.labels = [str(labels[index]) for index in sorted(labels)]
        if positive_label is not None and positive_label not in self.labels:
            raise ValueError(f"{uri}: label {positive_label!r} is not one of {self.labels}")
        self.positive_label = positive_label if positive_label is not None else self.labels[-1]

    def probabilities(self, text: str) -> dict[str, float]:
        encoded = self.tokenizer(text, truncation=True, max_length=self.max_length, return_tensors="pt")
        with self._torch.inference_mode():
            logits = self.model(**encoded).logits[0]
        if len(self.labels) == 1:
            return {self.labels[0]: float(self._torch.sigmoid(logits[0]))}
        return dict(zip(self.labels, (float(p) for p in logits.softmax(-1)), strict=True))

    def positive_probability(self, text: str) -> float:
        return self.probabilities(text)[self.positive_label]
