"""The ``encoder`` and ``hf`` backends, and :func:`load_classifier` for all three.

Both run their network in eval mode under ``inference_mode`` (deterministic), turn logits into
calibrated probabilities, and explain each label with word occlusion; the encoder backend adds
the nearest labelled training examples (FAISS over the training set's embeddings).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import ArtifactError, resolve, sha256_file, verify_files
from pipeline.sentiment import LABEL_INDEX, LABELS, Prediction, canonical_label
from pipeline.sentiment.attribution import occlusion, pad_batch
from pipeline.sentiment.calibration import softmax
from pipeline.sentiment.examples import NearestExamples
from pipeline.sentiment.model import load_classifier as load_network
from pipeline.sentiment.model import predict_logits

MODELS_ENV = "FINSENTINEL_MODELS"
BACKENDS = ("encoder", "hf", "llm")


def models_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get(MODELS_ENV) or "models")


def resolve_model(ref: str | Path, root: str | Path | None = None
                  ) -> tuple[Path, dict[str, Any]]:
    """A published model by name (under ``root``), by its ``models/NAME`` directory, or by one
    version's directory; every file is checked against the manifest before use."""
    path = Path(ref)
    if (path / "manifest.json").exists():
        manifest = json.loads((path / "manifest.json").read_text())
        verify_files(path, manifest)
        return path, manifest
    if (path / "CURRENT").exists():
        return resolve(path.parent, path.name)
    base = models_root(root)
    if (base / str(ref) / "CURRENT").exists():
        return resolve(base, str(ref))
    raise ArtifactError(f"no sentiment model {str(ref)!r}: not a model directory and not a name "
                        f"under {base} (train one with `finsentinel sentiment train`)")


def _batched_probabilities(forward, sequences: list[list[int]], pad_id: int,
                           batch_size: int = 64) -> np.ndarray:
    """Class probabilities for token-id sequences, batched by length."""
    order = np.argsort([len(s) for s in sequences], kind="stable")
    out = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([sequences[i] for i in idx], pad_id)
        probs = forward(torch.as_tensor(ids), torch.as_tensor(mask))
        if out is None:
            out = np.empty((len(sequences), probs.shape[1]), dtype=np.float64)
        out[idx] = probs
    return out if out is not None else np.zeros((0, len(LABELS)))


def _rounded(probs: np.ndarray) -> dict[str, float]:
    return {label: round(float(p), 6) for label, p in zip(LABELS, probs, strict=True)}


class EncoderClassifier:
    """A model trained by ``finsentinel sentiment train`` (the default backend)."""

    backend = "encoder"

    def __init__(self, directory: Path, manifest: dict[str, Any], *, device: str = "cpu",
                 neighbours: int = 3, quantize: bool = False, batch_size: int = 64):
        self.directory, self.manifest, self.device = directory, manifest, device
        self.model, self.tokenizer, self.head = load_network(directory, device)
        if tuple(self.head.labels) != LABELS:
            raise ArtifactError(f"{directory}: labels {self.head.labels} are not {LABELS}")
        self.quantized = bool(quantize and device == "cpu")
        if self.quantized:
            self.model = torch.ao.quantization.quantize_dynamic(
                self.model, {torch.nn.Linear}, dtype=torch.qint8)
        elif device.startswith("cuda"):
            self.model = self.model.half()
        self.neighbours = neighbours
        self.batch_size = batch_size
        self.examples = NearestExamples.load(directory) if neighbours else None
        self.model_id = manifest["model_id"]
        self.version = manifest["version"]

    @classmethod
    def load(cls, ref: str | Path, root: str | Path | None = None, **kwargs: Any
             ) -> EncoderClassifier:
        directory, manifest = resolve_model(ref, root)
        if manifest.get("backend") != "encoder":
            raise ArtifactError(f"{directory}: not an encoder sentiment model "
                                f"(manifest kind {manifest.get('kind')!r})")
        return cls(directory, manifest, **kwargs)

    def audit_fields(self) -> dict[str, Any]:
        return {"backend": self.backend, "model_id": self.model_id,
                "model_version": f"{self.manifest['name']}@{self.version}",
                "weights_sha256": self.manifest["weights_sha256"],
                "temperature": self.head.temperature,
                "runtime": "int8-dynamic" if self.quantized else (
                    "fp16" if self.device.startswith("cuda") else "fp32"),
                "index_version": (f"{self.manifest['name']}@{self.version}:training-examples"
                                  if self.examples is not None else "-")}

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            logits, _ = self.model(ids.to(self.device), mask.to(self.device))
        return softmax(logits.float().cpu().numpy(), self.head.temperature)

    def classify(self, texts: Sequence[str], *, explain: bool = True) -> list[Prediction]:
        texts = list(texts)
        logits, pooled = predict_logits(self.model, self.tokenizer, texts, self.head.max_length,
                                        batch_size=self.batch_size, device=self.device)
        probs = softmax(logits, self.head.temperature)
        labels = probs.argmax(axis=1)
        attributions = neighbours = None
        if explain and texts:
            attributions = occlusion(
                self.tokenizer, texts, labels.tolist(),
                lambda seqs: _batched_probabilities(self._forward, seqs,
                                                    self.tokenizer.pad_token_id),
                max_length=self.head.max_length)
            if self.examples is not None:
                neighbours = self.examples.search(pooled, self.neighbours)
        out = []
        for i in range(len(texts)):
            explanation: dict[str, Any] = {}
            if attributions is not None:
                explanation["attributions"] = {"method": "occlusion", "words": attributions[i]}
            if neighbours is not None:
                explanation["nearest_training_examples"] = neighbours[i]
            out.append(Prediction(LABELS[labels[i]], _rounded(probs[i]), explanation))
        return out


def hf_label_order(id2label: Mapping[Any, str], label_map: Mapping[str, str] | None = None
                   ) -> list[int]:
    """For each output index of a checkpoint, the index into ``LABELS`` it means, read from the
    checkpoint's own ``id2label`` (or an explicit map); never assumed from the position."""
    mapped: dict[str, str] = {}
    for raw, value in (label_map or {}).items():
        label = canonical_label(value)
        if label is None:
            raise ValueError(f"label map: {raw}={value!r} is not one of {', '.join(LABELS)}")
        mapped[str(raw).strip().lower()] = label
    order = []
    for i in range(len(id2label)):
        name = id2label.get(i, id2label.get(str(i)))
        label = mapped.get(str(name).strip().lower()) or canonical_label(name)
        if label is None:
            raise ValueError(f"checkpoint label {i} is {name!r}, which does not say negative, "
                             "neutral or positive; give a label map (e.g. "
                             "LABEL_0=negative,LABEL_1=neutral,LABEL_2=positive)")
        order.append(LABEL_INDEX[label])
    if sorted(order) != list(range(len(LABELS))):
        raise ValueError(f"checkpoint labels {dict(id2label)} must name each of "
                         f"{', '.join(LABELS)} exactly once")
    return order


class HFClassifier:
    """Any local Hugging Face sequence-classification checkpoint (e.g. a FinBERT directory)."""

    backend = "hf"

    def __init__(self, directory: str | Path, *, label_map: Mapping[str, str] | None = None,
                 device: str = "cpu", max_length: int = 128, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from pipeline.encoder import check_safetensors_only

        self.directory = Path(directory)
        if not (self.directory / "config.json").exists():
            raise ArtifactError(f"{self.directory}: not a Hugging Face checkpoint directory "
                                "(no config.json)")
        check_safetensors_only(self.directory)  # never unpickle weights (they can run code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(self.directory), use_safetensors=True)
        self.model = self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        self.order = hf_label_order(self.model.config.id2label, label_map)
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        files = sorted(p for p in self.directory.iterdir()
                       if p.suffix in (".safetensors", ".bin") and p.is_file())
        if not files:
            raise ArtifactError(f"{self.directory}: no weights file (*.safetensors or *.bin)")
        self.weights_sha256 = {p.name: sha256_file(p) for p in files}
        combined = "".join(self.weights_sha256[k] for k in sorted(self.weights_sha256))
        from pipeline.artifacts import sha256_bytes

        self.model_id = f"{self.directory.name}@{sha256_bytes(combined.encode())[:12]}"

    def audit_fields(self) -> dict[str, Any]:
        return {"backend": self.backend, "model_id": self.model_id,
                "model_version": self.model_id, "weights_sha256": self.weights_sha256,
                "id2label": {str(k): v for k, v in self.model.config.id2label.items()},
                "index_version": "-"}

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits
        raw = softmax(logits.float().cpu().numpy())
        probs = np.zeros_like(raw)
        probs[:, self.order] = raw  # checkpoint column i -> LABELS[order[i]]
        return probs

    def classify(self, texts: Sequence[str], *, explain: bool = True) -> list[Prediction]:
        texts = list(texts)
        if not texts:
            return []
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        probs = _batched_probabilities(self._forward, encoded["input_ids"],
                                       self.tokenizer.pad_token_id or 0, self.batch_size)
        labels = probs.argmax(axis=1)
        attributions = None
        if explain:
            attributions = occlusion(
                self.tokenizer, texts, labels.tolist(),
                lambda seqs: _batched_probabilities(self._forward, seqs,
                                                    self.tokenizer.pad_token_id or 0,
                                                    self.batch_size),
                max_length=self.max_length)
        return [Prediction(LABELS[labels[i]], _rounded(probs[i]),
                           {"attributions": {"method": "occlusion", "words": attributions[i]}}
                           if attributions is not None else {})
                for i in range(len(texts))]


def load_classifier(backend: str, model: str, *, root: str | Path | None = None,
                    endpoint: str | None = None, label_map: Mapping[str, str] | None = None,
                    device: str | None = None, **kwargs: Any):
    """One entry point for every backend: ``encoder`` (a published model name or directory),
    ``hf`` (a checkpoint directory), ``llm`` (a local causal-LM directory, or with ``endpoint``
    the model name at an OpenAI-compatible server)."""
    from pipeline.encoder import default_device

    device = device or default_device()
    if backend == "encoder":
        return EncoderClassifier.load(model, root, device=device, **kwargs)
    if backend == "hf":
        return HFClassifier(model, label_map=label_map, device=device, **kwargs)
    if backend == "llm":
        from pipeline.sentiment.llm import HTTPLLMClassifier, LocalLLMClassifier

        if endpoint:
            return HTTPLLMClassifier(endpoint, model, **kwargs)
        return LocalLLMClassifier.load(model, device=device, **kwargs)
    raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
