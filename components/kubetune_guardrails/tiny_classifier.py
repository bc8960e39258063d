"""Train a tiny sequence-classification model from a config (no download): for tests, the evaluation
benchmark, and a deployment that wants a first classifier from its own labelled examples.

A word-level tokenizer is built from the training texts and a small BERT (from ``BertConfig``) is
trained on CPU; both are saved with ``save_pretrained``, so ``SequenceClassifier`` (and any Hugging
Face pipeline) loads the directory as it would a downloaded injection classifier such as a DeBERTa.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path


def train_tiny_classifier(
    texts: Sequence[str],
    labels: Sequence[int],
    out_dir: str | Path,
    label_names: Sequence[str] = ("SAFE", "INJECTION"),
    epochs: int = 40,
    seed: int = 0,
) -> Path:
    """Train on (text, label index) pairs and save model and tokenizer under ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    if len(texts) != len(labels) or not texts:
        raise ValueError("texts and labels must be non-empty and of the same length")
    random.seed(seed)
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    word_level = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    word_level.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special, min_frequency=1))
    word_level.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=256,
    )
    config = BertConfig(
        vocab_size=word_level.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    # the labels are PretrainedConfig's (num_labels follows id2label), not BertConfig's own arguments
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: index for index, name in enumerate(label_names)}
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    order = list(range(len(texts)))
    model.train()
    for _ in range(epochs):
        random.shuffle(order)
        for start in range(0, len(order), 16):
            batch = order[start : start + 16]
            encoded = tokenizer(
                [texts[i] for i in batch], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            loss = model(**encoded, labels=torch.tensor([labels[i] for i in batch])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
