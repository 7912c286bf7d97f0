"""A seeded random sample of the kill-and-resume matrix (``tests/resume_runs.py``): real
``mnv3det fit`` runs killed at a drawn point and resumed with ``--ckpt_path last`` end
bit-identical to uninterrupted ones. ``tools/resume_sweep.py`` runs the larger sweep.

The sample is fixed (the draw is seeded) and chosen to cover the cases that once differed:
``limit_train_batches`` shorter than the epoch with a kill at its end, a kill before the first
checkpoint (``--ckpt_path last`` then starts a new run), gradient accumulation, mid-epoch
validation, EMA, and 0-2 DataLoader workers. Each combination takes about 30 s on 2 cores.
"""

from __future__ import annotations

import pytest
from resume_runs import Combo, draw_combos, run_combo, table

SAMPLE = draw_combos(30, seed=0)
"""The sweep's default draw; the test runs the combinations of :data:`CHOSEN` from it."""
CHOSEN = (6, 7, 12)


def describe(combo: Combo) -> str:
    return f"{combo.options()} kill={combo.kill}@{combo.kill_step}"


@pytest.mark.slow
@pytest.mark.parametrize("index", CHOSEN, ids=[describe(SAMPLE[i]) for i in CHOSEN])
def test_killed_run_resumes_to_the_uninterrupted_result(index, tmp_path) -> None:
    outcome = run_combo(SAMPLE[index], tmp_path, timeout=300, index=index)
    print(table([outcome]))
    assert outcome.equal, table([outcome])
    if outcome.resumed_from is None:
        # no last.ckpt when killed: --ckpt_path last started a new run in the next folder
        assert outcome.folders[-1] != "version_0" or outcome.folders == ["version_0"]
    else:
        # one run, one folder: the resumed run wrote into the killed run's
        assert outcome.folders == ["version_0"]


def test_the_chosen_sample_covers_the_cases() -> None:
    chosen = [SAMPLE[i] for i in CHOSEN]
    assert {c.task for c in chosen} == {"detection", "segmentation"}
    assert any(c.limit is not None and c.kill == "epoch_end" for c in chosen)
    assert any(c.kill == "start" for c in chosen)
    assert {c.workers for c in chosen} >= {0, 2}
