"""Shared fixtures: tiny seeded configs that run in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch

from xkd.config import load_config

TINY = [
    "name=tiny",
    "data.name=digits",
    "data.image_size=16",
    "data.train_size=240",
    "data.val_size=80",
    "data.test_size=60",
    "teacher.model.name=cifar_resnet",
    "teacher.model.params={depth: 8, width: 8}",
    "teacher.train.epochs=2",
    "teacher.train.batch_size=32",
    "student_model.name=kdfmv_cnn",
    "student_model.params={widths: [4, 8, 8]}",
    "train.epochs=1",
    "train.batch_size=32",
    "evaluation.num_images=24",
    "evaluation.met_images=4",
    "evaluation.samples_per_class=1",
    "evaluation.batch_size=32",
]


def tiny_overrides(tmp_path, *extra: str) -> list[str]:
    return [*TINY, f"output_dir={tmp_path / 'runs'}", *extra]


@pytest.fixture(scope="session")
def make_tiny_args():
    """``make_tiny_args(folder, *extra)``: the tiny run as `--set` overrides writing under folder."""
    return tiny_overrides


@pytest.fixture
def tiny_args(tmp_path):
    """The tiny run as `--set` overrides writing under ``tmp_path``."""
    return tiny_overrides(tmp_path)


@pytest.fixture
def tiny_config(tmp_path):
    """A whole run on 16x16 digits: 2-epoch teacher, three 1-epoch students."""
    return load_config(None, tiny_overrides(tmp_path))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
