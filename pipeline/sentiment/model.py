"""The ``encoder`` backend's network: a BERT-style encoder, mean pooling, a linear head.

Artifacts are plain files, safetensors for every tensor (no pickle): ``model.safetensors`` (the
whole network), ``config.json`` and the tokenizer files, ``classifier.json`` (labels, maximum
length, calibration temperature), ``examples.safetensors`` + ``examples.jsonl`` (the training
set's pooled embeddings, for the nearest-example explanations) and ``README.md`` (the model card).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.sentiment import LABELS

WEIGHTS = "model.safetensors"
HEAD_CONFIG = "classifier.json"


@dataclass(frozen=True)
class HeadConfig:
    labels: tuple[str, ...] = LABELS
    max_length: int = 64
    temperature: float = 1.0
    pooling: str = "mean"
    base_model: str = "all-MiniLM-L6-v2"


class PooledClassifier(nn.Module):
    """Mean-pooled encoder output -> dropout -> linear head over the labels."""

    def __init__(self, encoder: nn.Module, n_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, n_labels)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask
                              ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled embedding)."""
        pooled = self.pool(input_ids, attention_mask)
        return self.head(self.dropout(pooled)), pooled


def load_base(path: str | Path) -> tuple[nn.Module, Any]:
    """A pretrained encoder and its fast tokenizer from a local directory."""
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path))


def weights_hash(module: nn.Module) -> str:
    """sha256 over the parameters by name: exactly which weights made a prediction."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_classifier(directory: Path, model: PooledClassifier, tokenizer: Any,
                    head: HeadConfig) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    model.encoder.config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    (directory / HEAD_CONFIG).write_text(json.dumps(asdict(head), indent=2) + "\n")


def load_classifier(directory: Path, device: str = "cpu"
                    ) -> tuple[PooledClassifier, Any, HeadConfig]:
    """Rebuild the network from its config and load the safetensors weights (eval mode)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    head_raw = json.loads((directory / HEAD_CONFIG).read_text())
    head = HeadConfig(**{**head_raw, "labels": tuple(head_raw["labels"])})
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(directory)))
    model = PooledClassifier(encoder, len(head.labels))
    missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=False)
    # Position ids are a buffer some transformers versions save and others rebuild.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS}: weights do not fit the network "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model.to(device).eval(), tokenizer, head


def tokenize(tokenizer: Any, texts: list[str], max_length: int, device: str = "cpu"
             ) -> dict[str, torch.Tensor]:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device)}


def predict_logits(model: PooledClassifier, tokenizer: Any, texts: list[str], max_length: int,
                   *, batch_size: int = 64, device: str = "cpu"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(logits, pooled embeddings) for ``texts``, in order. Texts are batched by length so that
    padding stays small. Runs in eval mode (no dropout: deterministic) whatever mode the network
    is in, and gives it back in that mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _predict_logits(model, tokenizer, texts, max_length, batch_size, device)
    finally:
        model.train(was_training)


def _predict_logits(model: PooledClassifier, tokenizer: Any, texts: list[str], max_length: int,
                    batch_size: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    if not texts:
        dim = model.head.in_features
        return np.zeros((0, model.head.out_features), np.float32), np.zeros((0, dim), np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    logits = np.empty((len(texts), model.head.out_features), dtype=np.float32)
    pooled = np.empty((len(texts), model.head.in_features), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenize(tokenizer, [texts[i] for i in idx], max_length, device)
        out, emb = model(**batch)
        logits[idx] = out.float().cpu().numpy()
        pooled[idx] = emb.float().cpu().numpy()
    return logits, pooled
