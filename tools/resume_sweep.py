"""Kill-and-resume sweep: is a run killed anywhere and resumed with ``--ckpt_path last`` the same
as an uninterrupted one, for a random matrix of training options?

Draws ``--n`` combinations (seeded) of task, data size (not a multiple of the batch), batch size,
``limit_train_batches``, ``val_check_interval``, ``check_val_every_n_epoch``,
``accumulate_grad_batches``, gradient clipping, EMA (detection), DataLoader workers,
``LastCheckpoint(every_n_train_steps)`` and kill point; runs each as real ``mnv3det fit``
subprocesses (an uninterrupted run, then a SIGKILLed one resumed) and prints one table row per
combination: resumed-from step, final step (resumed / uninterrupted), bit-identical weights and
momenta or not, and the largest weight difference. The code is ``tests/resume_runs.py``, which
``tests/test_resume_matrix.py`` runs on a small fixed sample. CPU only, one thread per run::

    python tools/resume_sweep.py --n 30 --seed 0

Exits with status 1 when any combination differs or fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from resume_runs import Outcome, draw_combos, run_combo, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30, help="combinations to draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw")
    parser.add_argument("--first", type=int, default=0, help="skip the first N draws")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per subprocess")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"

    combos = draw_combos(args.n, args.seed)[args.first :]
    outcomes: list[Outcome] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for i, combo in enumerate(combos, start=args.first):
            print(f"[{i}] {combo.options()} kill={combo.kill}@{combo.kill_step}", flush=True)
            try:
                outcome = run_combo(combo, root / f"combo{i}", args.timeout, index=i)
            except Exception as err:  # one failed combination is reported, the sweep goes on
                failures.append(f"[{i}] {combo}: {type(err).__name__}: {err}")
                traceback.print_exc()
                continue
            outcomes.append(outcome)
            print(table([outcome]).splitlines()[-1], flush=True)
    print(f"\npython tools/resume_sweep.py --n {args.n} --seed {args.seed}\n")
    print(table(outcomes))
    for line in failures:
        print(line[:2000])
    return 0 if not failures and all(o.equal for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
