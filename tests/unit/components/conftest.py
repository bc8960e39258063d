"""Shared fixtures for the pipeline-component tests.

``tiny_model_dir`` (session): a random-weight tiny Llama + the tiny tokenizer, written with
    save_pretrained, so tests go through the real ``from_pretrained`` path. Builds in well under 1 s.
``tiny_tokenizer`` (function): that tokenizer loaded with ``models.load_tokenizer`` (a fresh
    object per test, so tests may change it).
``tiny_base_dir`` (session, slow): the *pretrained* tiny base (``tinylm.build_tiny_base``, about a
    minute on 2 cores). Set ``KUBETUNE_TINY_BASE_DIR`` to a directory that survives test runs to
    build it once and reuse it (the build is idempotent); otherwise it goes to a session temp dir.
``published_adapter`` (module): a LoRA adapter (r=4) on ``tiny_model_dir``, trained two steps on
    ``tiny_adapter.ROUTING_ROWS`` and published by the real steps (``tiny_adapter.publish_lora_adapter``).
``write_jsonl`` (function): ``write_jsonl(rows, name="data.jsonl") -> Path``; dict rows are
    dumped as JSON, str rows are written verbatim (to produce broken lines).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from kubetune_components.common import models
from kubetune_components.dev import tinylm
from tiny_adapter import ROUTING_ROWS, publish_lora_adapter

WriteJsonl = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinylm.build_random_tiny(tmp_path_factory.mktemp("tiny-random") / "model", seed=0)


@pytest.fixture
def tiny_tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return models.load_tokenizer(str(tiny_model_dir))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads; on a busy machine spinning threads slow them 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("KUBETUNE_TINY_BASE_DIR")
    target = Path(configured) if configured else tmp_path_factory.mktemp("tiny-base") / "model"
    return tinylm.build_tiny_base(target, seed=0)


@pytest.fixture(scope="module")
def published_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    # Typed here: plain `mypy FILE` does not search tests/ (pytest's pythonpath), so it reads Any.
    published: Path = publish_lora_adapter(
        tmp_path_factory.mktemp("published"),
        tiny_model_dir,
        ROUTING_ROWS,
        lora={"r": 4},
        training={"maxSteps": 2, "batchSize": 4, "learningRate": "5e-2", "seed": 1, "maxSeqLength": 64},
    )
    return published


@pytest.fixture
def write_jsonl(tmp_path: Path) -> WriteJsonl:
    def write(rows: Sequence[dict[str, Any] | str], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write
