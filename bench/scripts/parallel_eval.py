"""Run `attnpatch eval` jobs side by side on one machine (the GPU runs of the fidelity sweep).

    python bench/scripts/parallel_eval.py --out DIR --workers 12 --deadline-s 500 \
        --job "smollm2|4096,8192|bench/scripts/fidelity_specs.txt" --job "gemma3-270m|16384,32768|FILE" \
        -- --tasks passkey,perplexity,niah_single_1 --limit 20 --max-gen-toks 32 --backend triton

Each line of a spec file is one job (one process: the model loads once, then every length runs): a prefill method
spec, optionally followed by more `attnpatch eval` arguments for that job alone, e.g. `dense --decode
quest:budget=256` (decode fidelity); arguments after `--` go to every `attnpatch eval`. No job starts after
`--deadline-s`; running ones are stopped at `--deadline-s` + `--grace-s` (a finished length has already written its
JSON).
Each job logs to DIR/logs/. A job that fails with a GPU out-of-memory error (its log says `OutOfMemoryError`)
is run once more after the others, alone on the machine (`--no-retry-oom` turns that off; logs/NAME.retry.log):
long contexts with many processes on one GPU ran out of memory before (Gemma-3-270m at 32K with 10 processes).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path


def jobs_of(text: str) -> list[tuple[str, str, str]]:
    parts = text.split("|")
    if len(parts) != 3 or not Path(parts[2]).is_file():
        raise SystemExit(f"--job must be MODEL|LENGTHS|SPEC_FILE with an existing spec file, got {text!r}")
    model, lengths, spec_file = parts
    specs = [s.strip() for s in Path(spec_file).read_text().splitlines() if s.strip() and not s.startswith("#")]
    return [(model, lengths, s) for s in specs]


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--job", action="append", required=True, help="MODEL|LENGTHS|SPEC_FILE")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--deadline-s", type=float, default=500.0)
    p.add_argument("--grace-s", type=float, default=30.0)
    p.add_argument("--no-retry-oom", dest="retry_oom", action="store_false",
                   help="do not run a job that ran out of GPU memory once more, alone")
    args = p.parse_args(argv)
    queue = [j for text in args.job for j in jobs_of(text)]
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    running: list[tuple[subprocess.Popen, str, tuple[str, str, str], Path]] = []
    retry: list[tuple[str, str, str]] = []  # jobs that ran out of GPU memory: once more, alone
    retried: set[tuple[str, str, str]] = set()

    def launch(job: tuple[str, str, str], now: float, suffix: str = "") -> None:
        model, lengths, spec = job
        name = f"{model}__{re.sub(r'[^A-Za-z0-9._-]', '_', spec)}"
        path = out / "logs" / f"{name}{suffix}.log"
        log = open(path, "w")  # noqa: SIM115  (closed with the process)
        method, *own = shlex.split(spec)
        cmd = [sys.executable, "-m", "attnpatch.cli", "eval", "--model", model, "--methods", method,
               "--lengths", lengths, "--out", str(out / f"eval_{model}"), *extra, *own]
        running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), name + suffix, job, path))
        print(f"{now:6.0f}s start {name}{suffix}", flush=True)

    while queue or running or retry:
        still = []
        for proc, name, job, path in running:
            if proc.poll() is None:
                still.append((proc, name, job, path))
            elif (proc.returncode and args.retry_oom and job not in retried
                  and "OutOfMemoryError" in path.read_text(errors="replace")):
                retry.append(job)
                retried.add(job)
                print(f"{time.time() - start:6.0f}s out of GPU memory, to run again alone: {name}", flush=True)
        running = still
        now = time.time() - start
        if now > args.deadline_s + args.grace_s:
            for proc, name, _, _ in running:
                proc.kill()
                print(f"stopped at the deadline: {name}", flush=True)
            break
        while queue and len(running) < args.workers and now < args.deadline_s:
            launch(queue.pop(0), now)
        if not queue and not running and retry and now < args.deadline_s:
            launch(retry.pop(0), now, ".retry")
        if (queue or retry) and now >= args.deadline_s:
            print(f"deadline: {len(queue) + len(retry)} job(s) not started: {[s for _, _, s in queue + retry]}",
                  flush=True)
            queue, retry = [], []
        time.sleep(2)
    print(f"done in {time.time() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
