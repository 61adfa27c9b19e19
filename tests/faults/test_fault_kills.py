"""SIGKILL the pipeline at many points (prep, train, eval, export, registry, outputs), run it again
each time, and require what an uninterrupted run gives: byte-identical shards, identical adapter
and merged tensors, the same eval report and samples, one registry version in production. After
every kill, whatever a reader can see is whole (see `harness.visible_output_problems`).

The killed runs follow each other in one state directory, each killed at the first remaining point
it reaches, so the whole sequence costs little more than one run plus a process start per kill.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import harness, secrets

pytestmark = pytest.mark.e2e
MIN_POINTS_HIT = 20
MAX_ROUNDS = 2
EVERY_STAGE = {"prep", "train", "eval", "export", "registry"}


def test_killed_runs_end_equal_to_an_uninterrupted_run(faults_root: Path, tiny_model_dir: Path, eval_endpoint, run_env: dict,
                                                       reference_run: Path) -> None:
    hit: list[harness.KillRecord] = []
    points = list(harness.KILL_POINTS)
    for round_index in range(MAX_ROUNDS):  # a later round, from scratch, retries the points passed unobserved
        run_dir = faults_root / f"killed-{round_index}"
        settings = secrets.secret_settings(eval_endpoint.base_url)
        config = harness.write_small_config(run_dir, tiny_model_dir, eval_endpoint.base_url, **settings)

        records, exit_code = harness.kill_round(config, run_dir, run_env, points, round_index, run_dir / "run.log")

        assert exit_code == 0, (run_dir / "run.log").read_text()[-3000:]
        assert [(r.point, r.visible_problems) for r in records if r.hit and r.visible_problems] == []
        assert harness.output_differences(run_dir, reference_run) == []
        assert harness.rows_lost(run_dir) == 0
        assert secrets.find_leaks([run_dir]) == []
        stages = {point.name: point.stage for point in harness.KILL_POINTS}
        hit += [record for record in records if record.hit]
        points = [point for point in points if point.name not in {record.point for record in hit}]
        # Enough points, and every stage among them: a round can pass a quick stage's points unobserved.
        if len(hit) >= MIN_POINTS_HIT and {stages[record.point] for record in hit} >= EVERY_STAGE:
            break
    assert len({record.point for record in hit}) >= MIN_POINTS_HIT, [point.name for point in points]
    assert {stages[record.point] for record in hit} >= EVERY_STAGE
