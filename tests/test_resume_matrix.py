"""A seeded random sample of the kill-and-resume matrix (``tests/resume_runs.py``): real
``mnv3det fit`` runs killed at a drawn point and resumed with ``--ckpt_path last`` end
bit-identical to uninterrupted ones. ``tools/resume_sweep.py`` runs the larger sweep.

The sample is fixed (the draw is seeded): ``limit_train_batches`` shorter than the epoch with a
kill at its end (which once resumed into the wrong batches), a kill before the first checkpoint
(``--ckpt_path last`` then starts a new run), a mid-epoch kill with gradient accumulation, both
tasks, gradient clipping and 0-2 DataLoader workers. Each combination takes 30-50 s on 2 cores.
"""

from __future__ import annotations

import pytest
from resume_runs import Combo, draw_combos, run_combo, table

from mnv3det.data.sampling import resumable_loader, split_key

SAMPLE = draw_combos(30, seed=0)
"""The sweep's default draw; the test runs the combinations of :data:`CHOSEN` from it."""
CHOSEN = (6, 7, 10)


def describe(combo: Combo) -> str:
    return f"{combo.options()} kill={combo.kill}@{combo.kill_step}"


@pytest.mark.slow
@pytest.mark.parametrize("index", CHOSEN, ids=[describe(SAMPLE[i]) for i in CHOSEN])
def test_killed_run_resumes_to_the_uninterrupted_result(index, tmp_path) -> None:
    outcome = run_combo(SAMPLE[index], tmp_path, timeout=300, index=index)
    print(table([outcome]))
    assert outcome.equal, table([outcome])
    if outcome.resumed_from is None:
        # no last.ckpt when killed: --ckpt_path last started a new run, in the next folder
        # when the killed run had made its own
        assert outcome.folders in (["version_0"], ["version_0", "version_1"]), outcome.folders
    else:
        # one run, one folder: the resumed run wrote into the killed run's
        assert outcome.folders == ["version_0"]


def test_the_chosen_sample_covers_the_cases() -> None:
    chosen = [SAMPLE[i] for i in CHOSEN]
    assert {c.task for c in chosen} == {"detection", "segmentation"}
    assert any(c.limit is not None and c.kill == "epoch_end" for c in chosen)
    assert any(c.kill == "start" for c in chosen)
    assert any(c.accumulate > 1 and c.kill == "mid_epoch" for c in chosen)
    assert {c.workers for c in chosen} == {0, 1, 2}


class Indices:
    """Ten items, each its own index."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key: int | tuple[int, int]) -> int:
        return split_key(key)[0]


def test_the_skip_belongs_to_the_checkpoint_epoch() -> None:
    """A checkpoint after 3 of 5 batches: the rest of that epoch, unless Lightning runs the next
    epoch (it ends epochs early with limit_train_batches), which then starts at its first batch."""
    data = Indices()
    full = resumable_loader(data, 2, seed=5)
    full.sampler.set_epoch(1)
    epoch1 = [batch.tolist() for batch in full]
    state = {"epoch": 0, "batches": 3, "num_batches": 5, "seed": 5}

    mid = resumable_loader(data, 2, seed=5)
    mid.load_state_dict(state)
    assert len(list(mid)) == 2 and mid.state_dict()["batches"] == 5  # the end of epoch 0

    shortened = resumable_loader(data, 2, seed=5)
    shortened.load_state_dict(state)
    shortened.sampler.set_epoch(1)  # what Lightning does before the first batch
    assert [batch.tolist() for batch in shortened] == epoch1
