"""Task kinds: transforms are right, deterministic in (seed, t), and differ across tasks."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

from lightning_plasticity.data import TASK_KINDS, ContinualDataModule

DATASET_FOR = {
    "random_targets": "gaussian_mixture",
    "slowly_changing_regression": "regression_teacher",
}


def make_dm(kind: str, seed: int = 0, **kw) -> ContinualDataModule:
    kw.setdefault("num_tasks", 6)
    return ContinualDataModule(DATASET_FOR.get(kind, "digits"), kind, seed=seed, **kw)


def task_fingerprint(dm: ContinualDataModule, task_id: int) -> str:
    x, y = dm.probe_batch(64, task_id=task_id)
    digest = hashlib.sha256()
    digest.update(dm.task_examples(task_id).numpy().tobytes())
    digest.update(x.numpy().tobytes())
    digest.update(y.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("kind", sorted(TASK_KINDS))
def test_task_is_pure_function_of_seed_and_task(kind: str) -> None:
    a, b = make_dm(kind), make_dm(kind)
    # Build b's tasks in reverse order: a task must not depend on which tasks came before.
    fb = {t: task_fingerprint(b, t) for t in reversed(range(4))}
    assert all(task_fingerprint(a, t) == fb[t] for t in range(4))
    other_seed = make_dm(kind, seed=1)
    if kind != "identity":
        assert task_fingerprint(other_seed, 1) != fb[1]


@pytest.mark.parametrize("kind", sorted(set(TASK_KINDS) - {"identity"}))
def test_tasks_differ_across_task_ids(kind: str) -> None:
    dm = make_dm(kind)
    prints = [task_fingerprint(dm, t) for t in range(4)]
    assert len(set(prints)) == 4


def test_identity_changes_nothing() -> None:
    dm = make_dm("identity")
    idx = dm.task_examples(3)[:16]
    x, y = dm.apply_task(dm.base.train_x[idx], dm.base.train_y[idx], idx, 3)
    torch.testing.assert_close(x, dm.base.normalize(dm.base.train_x[idx]))
    assert torch.equal(y, dm.base.train_y[idx])


def test_identical_across_processes() -> None:
    code = (
        "from tests.data.test_tasks import make_dm, task_fingerprint, TASK_KINDS\n"
        "for k in sorted(TASK_KINDS):\n"
        "    print(k, task_fingerprint(make_dm(k), 2))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(__import__("tests.conftest").conftest.REPO)).stdout
    for line in out.strip().splitlines():
        kind, fingerprint = line.split()
        assert fingerprint == task_fingerprint(make_dm(kind), 2), kind


def test_permuted_labels_is_a_bijection() -> None:
    dm = make_dm("permuted_labels")
    for t in range(5):
        perm = dm.kind.permutation(t)
        assert sorted(perm.tolist()) == list(range(10))
        idx = dm.task_examples(t)
        _, y = dm.apply_task(dm.base.train_x[idx], dm.base.train_y[idx], idx, t)
        assert torch.equal(y, perm[dm.base.train_y[idx]])
        # A bijection keeps the class histogram up to relabelling.
        assert sorted(torch.bincount(y, minlength=10).tolist()) == sorted(
            torch.bincount(dm.base.train_y[idx], minlength=10).tolist())


def test_permuted_inputs_rearranges_pixels() -> None:
    dm = make_dm("permuted_inputs")
    idx = dm.task_examples(0)[:32]
    base = dm.base.normalize(dm.base.train_x[idx])
    for t in range(3):
        perm = dm.kind.permutation(t)
        assert sorted(perm.tolist()) == list(range(64))
        x, y = dm.apply_task(dm.base.train_x[idx], dm.base.train_y[idx], idx, t)
        assert torch.equal(y, dm.base.train_y[idx])
        torch.testing.assert_close(x.flatten(1), base.flatten(1)[:, perm])
        # Same pixel values per image, only moved.
        torch.testing.assert_close(x.flatten(1).sort(dim=1).values,
                                   base.flatten(1).sort(dim=1).values)


def test_permuted_inputs_on_flat_vectors() -> None:
    dm = ContinualDataModule("gaussian_mixture", "permuted_inputs", synthetic_input_dim=12)
    idx = dm.task_examples(0)[:8]
    x, _ = dm.apply_task(dm.base.train_x[idx], dm.base.train_y[idx], idx, 1)
    expected = dm.base.normalize(dm.base.train_x[idx])[:, dm.kind.permutation(1)]
    torch.testing.assert_close(x, expected)


def test_random_labels_are_fresh_per_task_and_fixed_per_example() -> None:
    dm = make_dm("random_labels")
    idx = dm.task_examples(0)
    _, y0 = dm.apply_task(dm.base.train_x[idx], dm.base.train_y[idx], idx, 0)
    _, y0_again = dm.apply_task(dm.base.train_x[idx[:10]], dm.base.train_y[idx[:10]],
                                idx[:10], 0)
    _, y1 = dm.apply_task(dm.base.train_x[idx], dm.base.train_y[idx], idx, 1)
    assert torch.equal(y0[:10], y0_again)
    agreement = (y0 == y1).float().mean().item()
    assert 0.03 < agreement < 0.2  # chance level for 10 classes
    assert (y0 == dm.base.train_y[idx]).float().mean().item() < 0.2


def test_class_pairs_are_binary_and_never_repeat() -> None:
    dm = make_dm("class_pairs", num_tasks=45)
    pairs = [frozenset(dm.kind.pair(t)) for t in range(45)]
    assert len(set(pairs)) == 45 and all(len(p) == 2 for p in pairs)
    assert dm.num_outputs == 2
    for t in range(3):
        idx = dm.task_examples(t)
        assert set(dm.base.train_y[idx].tolist()) == set(dm.kind.pair(t))
        _, y = dm.apply_task(dm.base.train_x[idx], dm.base.train_y[idx], idx, t)
        assert set(y.tolist()) == {0, 1}
        assert torch.equal(y == 1, dm.base.train_y[idx] == dm.kind.pair(t)[1])


def test_class_incremental_adds_classes() -> None:
    dm = make_dm("class_incremental", classes_per_task=3)
    seen = [set(dm.base.train_y[dm.task_examples(t)].tolist()) for t in range(5)]
    assert [len(s) for s in seen] == [3, 6, 9, 10, 10]
    assert all(seen[t] <= seen[t + 1] for t in range(4))
    assert dm.num_outputs == 10


def test_random_targets_have_configured_mean_and_scale() -> None:
    dm = ContinualDataModule("gaussian_mixture", "random_targets", target_mean=50.0,
                             target_scale=3.0, target_dim=2, synthetic_num_examples=4000)
    assert dm.is_regression and dm.num_outputs == 2
    idx = dm.task_examples(0)[:1024]
    _, y = dm.apply_task(dm.base.train_x[idx], dm.base.train_y[idx], idx, 0)
    assert y.shape == (1024, 2)
    torch.testing.assert_close(y.mean(0), torch.full((2,), 50.0), atol=0.3, rtol=0)
    torch.testing.assert_close(y.std(0), torch.full((2,), 3.0), atol=0.3, rtol=0)


def test_slowly_changing_regression_flips_one_slow_bit_per_task() -> None:
    dm = make_dm("slowly_changing_regression", num_tasks=10)
    f = dm.task_options.num_slow_bits
    bits = [dm.kind.slow_bits(t) for t in range(8)]
    for a, b in zip(bits, bits[1:]):
        assert int((a != b).sum()) == 1
    # Computed out of order, the bits are the same (pure function of (seed, t)).
    assert torch.equal(ContinualDataModule("regression_teacher", "slowly_changing_regression",
                                           num_tasks=10).kind.slow_bits(7), bits[7])
    idx = dm.task_examples(3)[:50]
    x, y = dm.apply_task(dm.base.train_x[idx], dm.base.train_y[idx], idx, 3)
    assert torch.equal(x[:, :f], bits[3].expand(50, f))
    assert torch.equal(x[:, f:], dm.base.train_x[idx][:, f:])
    torch.testing.assert_close(y, dm.base.teacher(x))
