"""Study files: validation and the grid's expansion into cells."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_plasticity.study import expand_study, load_study_spec

REPO = Path(__file__).resolve().parents[2]


def write(folder: Path, study: dict) -> Path:
    (folder / "recipe.yaml").write_text("seed_everything: 0\n")
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_grid_is_recipes_times_variants_times_seeds(tmp_path: Path) -> None:
    spec = load_study_spec(write(tmp_path, {
        "name": "s",
        "recipes": {"a": "recipe.yaml",
                    "b": {"recipe": "recipe.yaml", "args": {"model.init_args.lr": 0.1},
                          "seeds": [7]}},
        "methods": {"plain": {}, "l2": {"model.class_path": "L2Classifier",
                                        "model.init_args.l2_coef": [0.01, 0.1]}},
        "seeds": [0, 1],
        "args": {"data.init_args.num_tasks": 3},
        "only": {"b": ["l2"]},
    }))
    cells = expand_study(spec, {"trainer.max_steps": 5})
    assert [c.id for c in cells] == [
        "a__plain__default__seed0", "a__plain__default__seed1",
        "a__l2__l2_coef=0.01__seed0", "a__l2__l2_coef=0.01__seed1",
        "a__l2__l2_coef=0.1__seed0", "a__l2__l2_coef=0.1__seed1",
        "b__l2__l2_coef=0.01__seed7", "b__l2__l2_coef=0.1__seed7",
    ]
    command = cells[-1].command()
    assert command[:5] == ["lightning-plasticity", "fit", "--config",
                           str(tmp_path / "recipe.yaml"), "--seed_everything"]
    pairs = dict(zip(command[2::2], command[3::2]))
    assert pairs == {"--config": str(tmp_path / "recipe.yaml"), "--seed_everything": "7",
                     "--data.init_args.seed": "7", "--data.init_args.num_tasks": "3",
                     "--model.init_args.lr": "0.1", "--trainer.max_steps": "5",
                     "--model.class_path": "L2Classifier", "--model.init_args.l2_coef": "0.1"}


def test_appended_callbacks_are_swept_by_their_init_args(tmp_path: Path) -> None:
    spec = load_study_spec(write(tmp_path, {
        "recipes": {"r": "recipe.yaml"},
        "methods": {"snp": {"trainer.callbacks+": [
            {"class_path": "ShrinkAndPerturb", "init_args": {"alpha": 0.4}},
            {"class_path": "ShrinkAndPerturb", "init_args": {"alpha": 0.8}}]}},
    }))
    cells = expand_study(spec)
    assert [c.variant for c in cells] == ["alpha=0.4", "alpha=0.8"]
    assert cells[0].command()[-2:] == ["--trainer.callbacks+",
                                       "{class_path: ShrinkAndPerturb, init_args: {alpha: 0.4}}"]


def test_environment_variables_expand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LP_TEST_DIR", "/data/here")
    monkeypatch.delenv("LP_UNSET", raising=False)
    spec = load_study_spec(write(tmp_path, {
        "recipes": {"r": "recipe.yaml"},
        "args": {"data.init_args.data_dir": "${LP_TEST_DIR}", "x": "${LP_UNSET:-fallback}"}}))
    assert spec.args == {"data.init_args.data_dir": "/data/here", "x": "fallback"}


@pytest.mark.parametrize("study, message", [
    ({"methods": {}}, "needs `recipes:`"),
    ({"recipes": {"r": "missing.yaml"}}, "does not exist"),
    ({"recipes": {"r": "recipe.yaml"}, "seeds": ["a"]}, "list of integers"),
    ({"recipes": {"r": "recipe.yaml"}, "only": {"r": ["nope"]}}, "not under `methods:`"),
    ({"recipes": {"r": "recipe.yaml"}, "method": {}}, "unknown keys ['method']"),
    ({"recipes": {"r": "recipe.yaml"}, "args": {"d": "${LP_SURELY_UNSET}"}},
     "LP_SURELY_UNSET is not set"),
])
def test_bad_study_files_say_what_to_change(tmp_path: Path, study: dict, message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=None) as err:
        load_study_spec(write(tmp_path, study))
    assert message in str(err.value)


@pytest.mark.parametrize("study", sorted((REPO / "recipes").glob("**/study.yaml")),
                         ids=lambda p: p.parent.name)
def test_shipped_studies_expand(study: Path) -> None:
    cells = expand_study(load_study_spec(study))
    assert cells and len({c.id for c in cells}) == len(cells)
    for cell in cells:
        assert Path(cell.recipe_path).is_file()
