"""`attnpatch` command line: methods | demo | eval | report | inspect | bench kernels | lm-eval."""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from attnpatch.registry import list_methods


def _parse_options(pairs: list[str]) -> dict:
    """`key=value` pairs; values parsed as JSON when possible (ints, floats, bools), else strings."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"option {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_methods(_args) -> None:
    rows = list_methods()
    print(f"{'name':<11} {'phase':<15} {'options (defaults)':<44} description")
    for m in rows:
        opts = ", ".join(f"{k}={v}" for k, v in m["options"].items()) or "-"
        print(f"{m['name']:<11} {m['phase']:<15} {opts:<44} {m['description']}")


def cmd_demo(args) -> None:
    from attnpatch.demo import demo

    demo(args.model, args.method, args.length, args.depth, args.seed, args.max_new_tokens, **_parse_options(args.option))


def cmd_eval(args) -> None:
    from attnpatch.eval.suite import run_grid

    per_method: dict[str, dict] = {}
    for key, value in _parse_options(args.option).items():
        method, _, name = key.partition(".")
        if not name:
            raise ValueError(f"eval options are METHOD.OPTION=VALUE (e.g. a_shape.local_blocks=4), got {key!r}")
        per_method.setdefault(method, {})[name] = value
    files = run_grid(args.model, args.methods.split(","), args.tasks.split(","),
                     [int(x) for x in args.lengths.split(",")], args.limit, args.out, per_method)
    print(f"wrote {len(files)} result files to {args.out}")


def cmd_report(args) -> None:
    from attnpatch.eval.report import write_report

    path = write_report(args.results, args.out, args.bench)
    print(f"wrote {path} and {path.with_suffix('.png')}")


def cmd_inspect(args) -> None:
    from pathlib import Path

    from attnpatch.eval.fidelity import measure, plot_layers
    from attnpatch.models import load

    model, tok = load(args.model)
    if args.prompt is not None:
        text = args.prompt
    elif args.task == "passkey":
        from attnpatch.eval.passkey import passkey_sample

        text = passkey_sample(tok, target_tokens=args.length).prompt
    else:
        from attnpatch.eval.texts import austen

        text = austen()
    ids = tok(text, return_tensors="pt").input_ids[:, : args.length]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else []
    heads = [int(x) for x in args.heads.split(",")]
    report, records = measure(model, ids, args.method, keep_layers=layers, model_name=args.model,
                              **_parse_options(args.option))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(report.to_dict(), indent=1))
    if records:
        plot_layers(records, heads, out / "fidelity.png")
    s = report.summary()
    print(f"{args.method} on {args.model}, {report.tokens} tokens: density {s['density']:.3f}, "
          f"attention recall {s['recall']:.3f}, output relative error {s['rel_error']:.4f}; "
          f"dense layers {report.dense_layers or 'none'}; wrote {out / 'fidelity.json'}")


def cmd_bench(args) -> None:
    if args.what == "kernels":
        from attnpatch.bench.kernels import main as kernels_main

        raise SystemExit(kernels_main(args.rest))


def cmd_lm_eval(argv: list[str]) -> NoReturn:
    """Hand `argv` to lm-eval's CLI with model `attnpatch` registered."""
    try:
        from attnpatch.eval.lm_eval_plugin import main as lm_eval_main
    except ImportError as e:
        raise SystemExit(f"attnpatch lm-eval needs the eval extra (pip install 'attnpatch[eval]'): {e}") from e
    raise SystemExit(lm_eval_main(argv))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnpatch", description="Sparse attention for Hugging Face LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the methods and their options").set_defaults(func=cmd_methods)
    d = sub.add_parser("demo", help="passkey retrieval on the embedded checkpoint: dense vs a sparse method")
    d.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local HF directory or a hub id")
    d.add_argument("--method", default="a_shape", help="prefill method to compare with dense")
    d.add_argument("--length", type=int, default=4096, help="prompt length in tokens (about)")
    d.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1]")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-new-tokens", type=int, default=8)
    d.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="method option")
    d.set_defaults(func=cmd_demo)
    ev = sub.add_parser("eval", help="offline long-context suite: methods × lengths × tasks, one JSON per run")
    ev.add_argument("--model", default="smollm2")
    ev.add_argument("--methods", default="dense,a_shape,blasst")
    ev.add_argument("--tasks", default="passkey,perplexity,niah_single_1")
    ev.add_argument("--lengths", default="2048,4096,8192")
    ev.add_argument("--limit", type=int, default=4, help="samples per task")
    ev.add_argument("--out", default="eval-results")
    ev.add_argument("-o", "--option", action="append", default=[], metavar="METHOD.KEY=VALUE")
    ev.set_defaults(func=cmd_eval)
    rp = sub.add_parser("report", help="markdown + PNG from eval results (and a kernel benchmark JSON)")
    rp.add_argument("--results", default="eval-results")
    rp.add_argument("--bench", default=None, help="kernels.json from attnpatch bench kernels")
    rp.add_argument("--out", default="eval-results/report.md")
    rp.set_defaults(func=cmd_report)
    i = sub.add_parser("inspect", help="fidelity per layer/head (recall, output error, density) + heat maps")
    i.add_argument("--model", default="smollm2")
    i.add_argument("--method", default="a_shape")
    i.add_argument("--task", default="passkey", choices=("passkey", "austen"), help="where the prompt comes from")
    i.add_argument("--prompt", default=None, help="a prompt of your own instead of --task")
    i.add_argument("--length", type=int, default=2048, help="tokens (prompt truncated to it)")
    i.add_argument("--layers", default="0", help="layers to plot, comma separated")
    i.add_argument("--heads", default="0", help="heads to plot, comma separated")
    i.add_argument("--out", default="inspect-out")
    i.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="method option")
    i.set_defaults(func=cmd_inspect)
    b = sub.add_parser("bench", help="benchmarks (GPU): `attnpatch bench kernels --help`")
    b.add_argument("what", choices=("kernels",), help="kernels: executors vs SDPA cuDNN/flash and FlexAttention")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    b.set_defaults(func=cmd_bench)
    # listed for --help only: `main` hands everything after `lm-eval` to lm-eval before parsing
    sub.add_parser("lm-eval", help="lm-eval's CLI with model `attnpatch` registered (arguments go to lm-eval)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # everything after it belongs to lm-eval (argparse's REMAINDER
        # drops a leading `--option`), so it bypasses attnpatch's parser
        cmd_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"attnpatch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
