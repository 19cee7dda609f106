"""Bad input gives an error that says what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_plasticity.data import ContinualDataModule


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "imagenet21k"}, "Unknown dataset 'imagenet21k'. Choose one of: digits"),
        ({"task": "shuffled"}, "Unknown task kind 'shuffled'. Choose one of: permuted_labels"),
        ({"steps_per_task": 0}, "steps_per_task must be >= 1, got 0"),
        ({"steps_per_task": -5}, "steps_per_task must be >= 1, got -5"),
        ({"steps_per_task": 5, "epochs_per_task": 1}, "either steps_per_task or epochs_per_task"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"persistent_workers": True}, "persistent_workers=True needs num_workers > 0"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ContinualDataModule(**kwargs)


def test_class_pairs_needs_two_classes() -> None:
    dm = ContinualDataModule("gaussian_mixture", "class_pairs", synthetic_num_classes=1)
    with pytest.raises(ValueError, match="class_pairs needs at least 2 classes .* has 1 left"):
        dm.setup("fit")


def test_class_pairs_runs_out_of_pairs() -> None:
    dm = ContinualDataModule("digits", "class_pairs", num_tasks=46)
    with pytest.raises(ValueError, match=r"at most 45 tasks from 10 classes .* Lower num_tasks"):
        dm.setup("fit")


def test_label_task_on_regression_data() -> None:
    dm = ContinualDataModule("regression_teacher", "permuted_labels")
    with pytest.raises(ValueError, match="needs a classification dataset"):
        dm.setup("fit")


def test_missing_data_dir_without_download(tmp_path: Path) -> None:
    dm = ContinualDataModule("mnist", data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError, match="Set download=True .* point data_dir"):
        dm.setup("fit")


def test_image_folder_missing(tmp_path: Path) -> None:
    dm = ContinualDataModule("image_folder", data_dir=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dm.setup("fit")


def test_image_folder_without_class_subfolders(tmp_path: Path) -> None:
    (tmp_path / "loose.png").write_bytes(b"")
    dm = ContinualDataModule("image_folder", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="class subfolders"):
        dm.setup("fit")


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (6, 6), color=(10, 20, 30)).save(tmp_path / c / "ok.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png at all")
    dm = ContinualDataModule("image_folder", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"could not read image .*broken\.png.* Remove or replace"):
        dm.setup("fit")


def test_resume_with_a_different_seed_is_refused() -> None:
    state = ContinualDataModule(seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1 .* seed=2"):
        ContinualDataModule(seed=2).load_state_dict(state)


@pytest.mark.parametrize(("model_cls", "task", "message"), [
    ("ContinualClassifier", "random_targets", "use ContinualRegressor"),
    ("ContinualRegressor", "permuted_labels", "use ContinualClassifier"),
])
def test_model_that_cannot_learn_the_stream(model_cls: str, task: str, message: str) -> None:
    import lightning_plasticity.models as models
    from tests.data.helpers import fast_trainer

    dataset = "regression_teacher" if task == "random_targets" else "digits"
    dm = ContinualDataModule(dataset, task, num_tasks=1, steps_per_task=2, batch_size=8)
    with pytest.raises(ValueError, match=message):
        fast_trainer().fit(getattr(models, model_cls)(), datamodule=dm)


@pytest.mark.parametrize(("size", "task_id"), [(-5, None), (0, None), (2.5, None), (4, 99)])
def test_probe_batch_out_of_range(size: object, task_id: int | None) -> None:
    dm = ContinualDataModule(num_tasks=3, steps_per_task=2)
    with pytest.raises(ValueError, match="probe_batch: "):
        dm.probe_batch(size, task_id=task_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [{"steps_per_task": 7}, {"batch_size": 64}])
def test_resume_with_a_changed_stream_is_refused(change: dict) -> None:
    saved = ContinualDataModule(num_tasks=3, steps_per_task=5, batch_size=32).state_dict()
    resumed = ContinualDataModule(**{"num_tasks": 3, "steps_per_task": 5, "batch_size": 32,
                                     **change})
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"checkpoint's task stream has {key}="):
        resumed.load_state_dict(saved)


def test_max_epochs_that_conflicts_with_num_tasks() -> None:
    from lightning_plasticity.models import ContinualClassifier
    from tests.data.helpers import fast_trainer

    dm = ContinualDataModule(num_tasks=3, steps_per_task=2, batch_size=8)
    with pytest.raises(ValueError, match=r"max_epochs=2\) conflicts with the task stream"):
        fast_trainer(max_epochs=2).fit(ContinualClassifier(), datamodule=dm)
