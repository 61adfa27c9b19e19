"""What a fully cached nightly run costs, as a user waits for it.

Run from the repository root: `.venv/bin/python -m benchmarks.cached_run` (after `make quickstart`,
or it runs the quickstart once first, which takes about a minute on an idle 2-core machine).

Measures, each as the median of `--repeats` fresh processes:
1. `python -c "import torch, transformers"`: the baseline, what merely loading the stack costs;
2. `loraflow run configs/quickstart.yaml` with every stage cached and Prefect's ephemeral server
   (no PREFECT_API_URL): the whole command, process start to exit (target <= 10 s);
3. the same against a running Prefect server started here on 127.0.0.1 (target <= 3 s).

The last line printed is one JSON object with every figure and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = "configs/quickstart.yaml"
TINY_MODEL = REPO / ".loraflow" / "models" / "tiny-llama"
QUICKSTART_DATA = REPO / "examples" / "quickstart" / "finance_sentiment.jsonl"


def timed(command: list[str], environment: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds


def cached_states(environment: dict[str, str]) -> list[str]:
    summary = json.loads((REPO / "outputs" / "quickstart" / "run_summary.json").read_text())
    return [outcome["state"] for outcome in summary["stages"].values()]


def start_server(environment: dict[str, str], port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the Prefect server did not become healthy within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tasks.serving import free_port

    prefect_home = tempfile.mkdtemp(prefix="cached-run-prefect-")
    environment = {**os.environ, "PREFECT_HOME": prefect_home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    environment.pop("PREFECT_API_URL", None)
    loraflow = [str(BIN / "loraflow"), "run", CONFIG]
    if not (TINY_MODEL / "config.json").is_file():
        subprocess.run([str(BIN / "loraflow"), "tiny-model", str(TINY_MODEL), "--corpus", str(QUICKSTART_DATA)], cwd=REPO, check=True)
    # Makes sure every stage is published (and the ephemeral database exists) before timing.
    first_s = timed(loraflow, environment)

    baseline = [timed([sys.executable, "-c", "import torch, transformers"], environment) for _ in range(args.repeats)]
    ephemeral = [timed(loraflow, environment) for _ in range(args.repeats)]
    assert set(cached_states(environment)) == {"cached"}, cached_states(environment)

    port = free_port()
    server = start_server(environment, port)
    try:
        with_server = {**environment, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        timed(loraflow, with_server)  # the server's first flow run registers the flow
        against_server = [timed(loraflow, with_server) for _ in range(args.repeats)]
        assert set(cached_states(with_server)) == {"cached"}, cached_states(with_server)
    finally:
        server.terminate()
        server.wait(timeout=30)

    import_s = statistics.median(baseline)
    result = {
        "benchmark": "cached_run",
        "repeats": args.repeats,
        "first_run_s": round(first_s, 2),
        "import_torch_transformers_s": round(import_s, 2),
        "cached_run_ephemeral_s": round(statistics.median(ephemeral), 2),
        "cached_run_server_s": round(statistics.median(against_server), 2),
        "ephemeral_vs_import": round(statistics.median(ephemeral) / import_s, 2),
        "server_vs_import": round(statistics.median(against_server) / import_s, 2),
        "target_ephemeral_s": 10,
        "target_server_s": 3,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
