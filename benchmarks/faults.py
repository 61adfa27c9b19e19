"""Fault-injection, bad-input and secrets figures: nothing lost, nothing leaked.

Run from the repository root: `.venv/bin/python -m benchmarks.faults [--rounds N]` (a few minutes on
2 cores; each round is a sequence of SIGKILLed runs from scratch).

1. kills: the small pipeline of tests/faults/harness.py run once uninterrupted (the reference),
   then as `loraflow run` subprocesses SIGKILLed at the kill points, each run resuming the last;
   a point counts as tried when its condition was seen and the run killed there, as survived
   when nothing incomplete was visible after the kill and the round's final outputs equal the
   reference's. `--rounds 2` retries, from scratch, the points the first round passed unobserved.
2. bad inputs: the examples/bad/ corpus through the checks of tests/test_bad_inputs.py.
3. bad configs: tests/faults/bad_configs.py through load_config + preflight.
4. secrets: canaries in every secret setting of every run above, plus a run failing in eval on an
   endpoint that echoes the key; every file they left (Prefect's database included) is searched.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tasks.tiny_model import build_tiny_model
from tests.faults import harness, secrets
from tests.faults.bad_configs import CASES as BAD_CONFIGS
from tests.faults.bad_configs import check_case


def kill_figures(root: Path, model: Path, eval_url: str, env: dict, rounds: int) -> tuple[dict, Path]:
    reference = root / "reference"
    config = harness.write_small_config(reference, model, eval_url, **secrets.secret_settings(eval_url))
    started = time.monotonic()
    if harness.run_to_completion(config, env, reference / "run.log") != 0:
        raise SystemExit(f"the reference run failed:\n{(reference / 'run.log').read_text()[-3000:]}")
    print(f"reference run: {time.monotonic() - started:.0f} s", flush=True)
    tried: dict[str, bool] = {}  # point -> survived
    rows_lost = 0
    points = list(harness.KILL_POINTS)
    for round_index in range(rounds):
        run_dir = root / f"round-{round_index}"
        config = harness.write_small_config(run_dir, model, eval_url, **secrets.secret_settings(eval_url))
        started = time.monotonic()
        records, exit_code = harness.kill_round(config, run_dir, env, points, round_index, run_dir / "run.log")
        differences = harness.output_differences(run_dir, reference) if exit_code == 0 else [f"final run exit code {exit_code}"]
        rows_lost += harness.rows_lost(run_dir) if exit_code == 0 else 0
        for record in records:
            if record.hit:
                survived = not record.visible_problems and not differences
                tried[record.point] = tried.get(record.point, True) and survived
                print(f"  round {round_index}: killed at {record.point}: {'survived' if survived else record.visible_problems}")
        print(f"round {round_index}: {sum(r.hit for r in records)} kills, {time.monotonic() - started:.0f} s, "
              f"differences from the reference: {differences or 'none'}", flush=True)
        points = [point for point in points if point.name not in tried]
        if not points:
            break
    for point in points:
        print(f"  not tried (condition never observed): {point.name}")
    return {"kill_points_tried": len(tried), "kill_points_survived": sum(tried.values()), "kill_rows_lost": rows_lost}, reference


def failing_run(root: Path, model: Path, reference: Path, env: dict) -> Path:
    """Eval fails on an endpoint that rejects the key and echoes it back."""
    failing = root / "failing"
    shutil.copytree(reference / "state", failing / "state", symlinks=True)
    with harness.eval_server(api_keys={"the-only-key-it-takes"}) as rejecting:
        config = harness.write_small_config(failing, model, rejecting.base_url, **secrets.secret_settings(rejecting.base_url))
        exit_code = harness.run_to_completion(config, env, failing / "run.log")
    print(f"failing run: exit code {exit_code} (expected 1)")
    return failing


def bad_input_figures(root: Path, model: Path) -> dict:
    """Every case of examples/bad/EXPECTED.yaml through the test functions of tests/test_bad_inputs.py."""
    sys.path.insert(0, str(harness.REPO / "tests"))
    import test_bad_inputs as bad

    spec = importlib.util.spec_from_file_location("make_bad_inputs", harness.REPO / "examples" / "make_bad_inputs.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    generated = maker.write_generated(root / "bad-generated")
    handled = 0
    for index, case in enumerate(bad.CASES):
        check = bad.test_dataset_level_case_is_one_error_naming_the_file if "dataset_error_contains" in case else \
            bad.test_row_level_case_gives_its_reasons
        try:
            check(case, generated, model, root / f"bad-{index}")
            handled += 1
        except Exception as error:  # noqa: BLE001 - a failed check of any kind is "not handled"
            print(f"  bad input not handled: {case['name']}: {type(error).__name__}: {str(error)[:200]}")
    # One prep over every plain row-level case: each row accepted or quarantined.
    cases = [case for case in bad.ROW_CASES if "prep" not in case and "bug" not in case]
    manifest, quarantine = bad.prep_with_quarantine(bad.run_config(root / "bad-all", model, [bad.dataset_for(c, generated) for c in cases]))
    rows_lost = sum(case["rows"] for case in cases) - manifest["rows_accepted"] - len(quarantine)
    return {"bad_inputs_tried": len(bad.CASES), "bad_inputs_handled": handled, "bad_input_rows_lost": rows_lost}


def bad_config_figures(root: Path, model: Path) -> dict:
    caught = 0
    for case in BAD_CONFIGS:
        outcome = check_case(case, root / "bad-configs" / case.name, model)
        caught += outcome.caught
        if not outcome.caught:
            known = f" (known bug: {case.bug})" if case.bug else ""
            print(f"  bad config not caught in preflight: {case.name}: {outcome.why_not}{known}")
    return {"bad_configs_tried": len(BAD_CONFIGS), "bad_configs_caught": caught}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=1, help="Kill rounds from scratch (later ones retry points not yet tried).")
    arguments = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loraflow-faults-") as scratch:
        root = Path(scratch)
        model = build_tiny_model(root / "model", seed=0, corpus_files=[harness.QUICKSTART_DATA])
        figures = {**bad_config_figures(root, model), **bad_input_figures(root, model)}
        keys = {secrets.CANARIES["LORAFLOW_FAULTS_EVAL_KEY"], secrets.CANARIES["LORAFLOW_FAULTS_JUDGE_KEY"]}
        with harness.prefect_server(root / "prefect-home") as server_env, harness.eval_server(api_keys=keys) as endpoint:
            env = {**server_env, **secrets.canary_env()}
            kills, reference = kill_figures(root, model, endpoint.base_url, env, arguments.rounds)
            failing_run(root, model, reference, env)
        leaks = secrets.find_leaks([root])
        for leak in leaks:
            print(f"  secret leaked: ${leak.variable} in {leak.path}")
    result = {
        "kill_points_tried": kills["kill_points_tried"],
        "kill_points_survived": kills["kill_points_survived"],
        "bad_inputs_tried": figures["bad_inputs_tried"],
        "bad_inputs_handled": figures["bad_inputs_handled"],
        "bad_configs_tried": figures["bad_configs_tried"],
        "bad_configs_caught": figures["bad_configs_caught"],
        "rows_lost": kills["kill_rows_lost"] + figures["bad_input_rows_lost"],
        "secrets_leaked": len(leaks),
        "duration_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
