"""`attnpatch` command line: methods | demo | eval | calibrate | run | report | inspect | bench kernels | lm-eval.

Only the standard library loads with this module: torch, transformers and the method tables load
when a command needs them, so `attnpatch lm-eval --help` answers at once and offline. Method
arguments are specs (`a_shape` or `a_shape:local_blocks=4`), validated before any model loads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from typing import TYPE_CHECKING, Any, NoReturn

DEMO_SPEC = "proxyattn:dense_tail=1"  # attnpatch.demo.DEFAULT_SPEC (kept here: `--help` imports no torch)

if TYPE_CHECKING:
    from types import ModuleType

    from attnpatch.registry import MethodInfo
    from attnpatch.spec import PatchSpec

LM_EVAL_HELP = """\
usage: attnpatch lm-eval [lm-eval arguments ...]

lm-eval's own command line with model `attnpatch` registered: the harness's HFLM running a model
patched by attnpatch. Every argument after `lm-eval` goes to lm-eval unchanged.

--model_args for `--model attnpatch` (key=value, comma separated):
  pretrained=DIR|HUB_ID|smollm2   the model (default: smollm2, the embedded checkpoint)
  method=NAME[:key=value]         prefill method (default: dense); `attnpatch methods` lists them
  decode=NAME[:key=value]         decode method (default: dense)
  OPTION=VALUE                    an option of the chosen methods (local_blocks=4, window=512, ...)
  prefill.OPTION=VALUE            an option both methods declare (blasst's a), for one phase
  decode.OPTION=VALUE
  attn_backend=NAME               auto (default; evaluations run it as sparse), sparse, reference, triton, flex, flash
                                  (`backend` is HFLM's own argument)
  profile=FILE.json               per-layer / per-head parameters from a calibration profile
  allow_other_weights=true        accept a profile made for other weights of the same architecture
  profile_shift=X                 move the profile's calibrated knob, X in [-1, 1] (+ denser)
  profile_sparsity=S              BLASST profiles: a per phase for skipped share S (its a(S) table)
  anything else                   HFLM's arguments: dtype, device, batch_size, max_length, parallelize

A comma ends a model_args entry, so a method's second option is an entry of its own:
method=a_shape:local_blocks=4,sink_blocks=2 is the same as method=a_shape,local_blocks=4,sink_blocks=2.

example (RULER needle in a haystack at 4K tokens, offline):
  attnpatch lm-eval run --model attnpatch \\
      --model_args pretrained=smollm2,method=a_shape:local_blocks=4,decode=streaming,window=512 \\
      --tasks niah_single_1 --metadata '{"max_seq_lengths":[4096]}' --limit 4

lm-eval's own help: `attnpatch lm-eval run --help` (every option), `attnpatch lm-eval ls tasks`.
"""

_SPEC_HELP = "NAME or NAME:key=value,..."


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == []:
            return action.help
        return super()._get_help_string(action)


def _tables() -> ModuleType:
    """The method registry with the built-in methods loaded."""
    import attnpatch.api  # noqa: F401  (registers the built-in methods)
    from attnpatch import registry

    return registry


def _names(phase: str) -> str:
    return ", ".join(sorted(m.name for m in _tables().method_infos(phase)))


def _parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs. Values stay text (each method option converts and checks its own type),
    except a JSON list (`[0.9, 0.95]`), for per-head values."""
    from attnpatch.spec import SPEC_KEYS

    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option {pair!r} must look like key=value")
        key, value = key.strip(), value.strip()
        if key in SPEC_KEYS:
            raise ValueError(f"{key!r} is not a method option (the method, decode method and backend have "
                             "arguments of their own)")
        if value.startswith("["):
            try:
                out[key] = json.loads(value)
                continue
            except json.JSONDecodeError as e:
                raise ValueError(f"option {key!r}: {value!r} is not a JSON list: {e}") from None
        out[key] = value
    return out


def _patch_spec(method: str, decode: str | None = None, pairs: list[str] | None = None,
                backend: str = "auto") -> PatchSpec:
    """A validated PatchSpec from CLI arguments (ValueError names what is allowed)."""
    _tables()
    from attnpatch.spec import PatchSpec

    options = _parse_options(pairs)
    try:
        return PatchSpec.build(method, decode, backend=backend, **options)
    except ValueError as e:
        if "declared by both" in str(e):
            raise ValueError(f"{e} (on the command line: -o prefill.KEY=VALUE or -o decode.KEY=VALUE)") from None
        raise


def _split(values: str | list[str] | None) -> list[str]:
    """Values given space separated, comma separated, or both."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else values
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def split_methods(values: str | list[str]) -> list[str]:
    """Method specs from `--methods`: space separated specs (`a_shape:local_blocks=4,sink_blocks=2`
    keeps its commas), or one comma separated list of plain names (`dense,a_shape,blasst`)."""
    items = [values] if isinstance(values, str) else list(values)
    out: list[str] = []
    for item in items:
        out += [item.strip()] if ":" in item else _split(item)
    return out


def _ints(values: str | list[str], what: str) -> list[int]:
    out = []
    for text in _split(values):
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"{what} takes positive integers, got {text!r}")
        out.append(value)
    return out


# -- methods ------------------------------------------------------------------------------------

def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False,
                         break_long_words=False) or [first.rstrip()]


def _option_lines(info: MethodInfo, pad: str, width: int, verbose: bool, key_width: int) -> list[str]:
    if not info.options:
        return [pad + "options: none"]
    if not verbose:
        text = ", ".join(f"{o.name}={o.default}" for o in info.options)
        return _wrap(text, width, pad + "options: ", pad + " " * len("options: "))
    lines = []
    for o in info.options:
        key = f"{o.name}={o.default}".ljust(key_width)
        text = f"{o.help}; {o.describe_allowed()}" if o.help else o.describe_allowed()
        lines += _wrap(text, width, f"{pad}{key}  ", pad + " " * (key_width + 2))
    return lines


def format_methods(verbose: bool = False, width: int = 100) -> str:
    """The method tables (one section per phase) and the backends, aligned and wrapped to `width`.
    `verbose` adds each option's help and allowed values."""
    from attnpatch.backends import backend_table

    infos = sorted(_tables().method_infos(), key=lambda m: m.name)
    backends = [("auto", "per phase, the fastest backend that takes the call (dense prefill stays SDPA); on "
                 "CUDA, a prefill where dense SDPA was measured faster runs dense"),
                ("sparse", "auto without that speed gate: the method always runs (what eval and lm-eval use)")]
    backends += [(b["name"], b["description"]) for b in backend_table()]
    name_width = max(len(name) for name in [m.name for m in infos] + [b for b, _ in backends])
    key_width = max((len(f"{o.name}={o.default}") for m in infos for o in m.options), default=0)
    pad = " " * (2 + name_width + 2)
    lines: list[str] = []
    for phase, arg in (("prefill", "--method / method="), ("decode", "--decode / decode=")):
        lines.append(f"{phase} methods ({arg}; NAME or NAME:key=value,...):")
        for m in (m for m in infos if m.phase == phase):
            lines += _wrap(m.description or "-", width, f"  {m.name.ljust(name_width)}  ", pad)
            lines += _option_lines(m, pad, width, verbose, key_width)
        lines.append("")
    lines.append("backends (--backend / backend= / lm-eval attn_backend=):")
    for name, text in backends:
        lines += _wrap(text, width, f"  {name.ljust(name_width)}  ", pad)
    if not verbose:
        lines += ["", "attnpatch methods -v adds each option's help and allowed values."]
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> None:
    width = max(60, min(120, shutil.get_terminal_size((100, 24)).columns))
    print(format_methods(args.verbose, width))


# -- commands -----------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> None:
    spec = _patch_spec(args.method, args.decode, args.option, args.backend)  # before the model loads
    if not 0.0 <= args.depth <= 1.0:
        raise ValueError(f"--depth must be in [0, 1], got {args.depth}")
    if args.length <= 0 or args.max_new_tokens <= 0:
        raise ValueError("--length and --max-new-tokens must be positive")
    from attnpatch.demo import demo

    demo(args.model, spec, args.length, args.depth, args.seed, args.max_new_tokens)


def _eval_options(pairs: list[str] | None) -> dict[str, dict[str, Any]]:
    per_method: dict[str, dict[str, Any]] = {}
    for key, value in _parse_options(pairs).items():
        method, _, name = key.partition(".")
        if not name:
            raise ValueError(f"eval options are METHOD.KEY=VALUE (e.g. a_shape.local_blocks=4), got {key!r}")
        per_method.setdefault(method, {})[name] = value
    return per_method


def cmd_eval(args: argparse.Namespace) -> None:
    from attnpatch.eval.suite import run_grid

    options = _eval_options(args.option)
    prefill = {m.name for m in _tables().method_infos("prefill")}
    for method in options:
        if method not in prefill and method in {m.name for m in _tables().method_infos("decode")}:
            raise ValueError(f"-o {method}.KEY=VALUE: {method!r} is a decode method; give its options inline, "
                             f"--decode {method}:KEY=VALUE")
    files = run_grid(args.model, split_methods(args.methods), _split(args.tasks), _ints(args.lengths, "--lengths"),
                     args.limit, args.out, options, decode=args.decode, backend=args.backend,
                     max_gen_toks=args.max_gen_toks)
    print(f"wrote {len(files)} result files to {args.out}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from attnpatch.calibrate import calibrate
    from attnpatch.calibrate.run import calibratable_methods
    from attnpatch.models import load

    if args.method not in calibratable_methods():
        raise ValueError(f"--method {args.method!r} cannot be calibrated; calibratable: "
                         f"{', '.join(calibratable_methods())}")
    options = _parse_options(args.option or [])
    if args.hess:
        _calibrate_hess(args, options)
        return
    target = _calibration_target(args)
    model, tok = load(args.model)
    profile = calibrate(model, tok, args.method, target=target, data=args.data,
                        samples=args.samples, lengths=_ints(args.lengths, "--lengths"), options=options,
                        steps=args.steps, name=args.name, accuracy_prompts=args.accuracy_prompts,
                        lambda_fit=args.lambda_fit)
    profile.meta["command"] = "attnpatch " + " ".join(args.argv)
    profile.save(args.out)
    a = profile.meta["achieved"]
    print(f"wrote {args.out}: {args.method} calibrated in {profile.meta['seconds']} s to {target.kind} "
          f"{target.value:g}; mean output error {a['error']:.4f}, mean density {a['density']:.3f}")


def _calibration_target(args: argparse.Namespace):
    """The one target of `attnpatch calibrate` (--target-error, --target-density or --accuracy-floor)."""
    from attnpatch.calibrate.target import Target

    given = [(kind, value) for kind, value in (("error", args.target_error), ("density", args.target_density),
                                               ("accuracy", args.accuracy_floor)) if value is not None]
    if len(given) > 1:
        raise ValueError("give one target: --target-error, --target-density or --accuracy-floor, not "
                         + " and ".join(f"--{k}" for k, _ in given))
    return Target(*given[0]) if given else Target("error", 0.05)


def _add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target (one of; default --target-error 0.05)")
    g.add_argument("--target-error", type=float, default=None,
                   help="relative attention-output error per head, in (0, 1)")
    g.add_argument("--target-density", type=float, default=None,
                   help="kept share of each head's causal blocks, in (0, 1] (blasst: 1 - skipped share)")
    g.add_argument("--accuracy-floor", type=float, default=None,
                   help="held-out passkey score ≥ FLOOR × dense's, in (0, 1]: an outer search on the error "
                        "tolerance (about 5 calibrations' time)")
    g.add_argument("--accuracy-prompts", type=int, default=4, help="passkey prompts of the accuracy floor")


def cmd_run(args: argparse.Namespace) -> None:
    """`attnpatch run RECIPE.yaml`: parse (everything checked before the model loads), run, report."""
    from attnpatch.eval.recipe import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    if args.check:
        print(f"{args.recipe}: ok — {recipe.model}, {recipe.spec}, tasks {', '.join(recipe.tasks)} at "
              f"{', '.join(map(str, recipe.lengths))} tokens, limit {recipe.limit}, out {recipe.out}")
        return
    report = run_recipe(recipe, args.out, args.limit)
    print(f"wrote {report} (and one JSON per run next to it)")


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    r = _sub(sub, "run", "run a recipe (YAML: model, patch, eval tasks and lengths, out); writes its report",
             "Loads the recipe's model, patches it with the recipe's spec (and runs dense next to it unless "
             "eval.baseline is false), runs the offline suite's tasks at each length, and writes one JSON "
             "per run plus report.md into the recipe's out folder. Recipes: recipes/*.yaml.")
    r.add_argument("recipe", help="a recipe YAML file, e.g. recipes/quickstart.yaml")
    r.add_argument("--out", default=None, help="output folder (default: the recipe's `out`)")
    r.add_argument("--limit", type=int, default=None, help="samples per task (default: the recipe's eval.limit)")
    r.add_argument("--check", action="store_true", help="parse and validate the recipe only; load nothing")
    r.set_defaults(func=cmd_run)


def _calibrate_hess(args: argparse.Namespace, options: dict) -> None:
    """`attnpatch calibrate --hess --target-density D`: HeSS budgets (and, with --uniform-out, the uniform
    baseline)."""
    from attnpatch.calibrate.hess import hess_measure
    from attnpatch.models import load

    density = args.target_density
    if density is None or args.target_error is not None or args.accuracy_floor is not None:
        raise ValueError("--hess takes its target as --target-density D: an average density D (in (0, 1]) "
                         "redistributed across heads; --target-error and --accuracy-floor do not apply")
    if not 0 < density <= 1:
        raise ValueError(f"--target-density is the average share of causal block pairs kept, in (0, 1]; got {density}")
    model, tok = load(args.model)
    cal = hess_measure(model, tok, args.method, data=args.data, samples=args.samples,
                       lengths=_ints(args.lengths, "--lengths"), options=options, grid=args.grid, form=args.form)
    command = "attnpatch " + " ".join(args.argv)
    profile = cal.redistribute(density, scope=args.scope, name=args.name, spread=args.spread, damping=args.damping)
    profile.meta["command"] = command
    profile.save(args.out)
    print(f"wrote {args.out}: HeSS {args.method} in {profile.meta['seconds']} s; mean density "
          f"{profile.meta['achieved']['density']:.3f} (target {density}) on the calibration prompts")
    if args.uniform_out:
        uniform = cal.uniform(density)
        uniform.meta["command"] = command
        uniform.save(args.uniform_out)
        print(f"wrote {args.uniform_out}: uniform {cal.knob.option}={uniform.meta['value']:.6g}, mean density "
              f"{uniform.meta['achieved']['density']:.3f}")


def cmd_report(args: argparse.Namespace) -> None:
    from attnpatch.eval.report import write_report

    path = write_report(args.results, args.out, args.bench)
    print(f"wrote {path} and {path.with_suffix('.png')}")


def cmd_inspect(args: argparse.Namespace) -> None:
    spec = _patch_spec(args.method, None, args.option)  # before the model loads
    layers = [int(x) for x in _split(args.layers)]
    heads = [int(x) for x in _split(args.heads)]
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
    report, records = measure(model, ids, spec, keep_layers=layers, model_name=args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(report.to_dict(), indent=1))
    if records:
        plot_layers(records, heads, out / "fidelity.png")
    s = report.summary()
    print(f"{args.method} on {args.model}, {report.tokens} tokens: density {s['density']:.3f}, "
          f"attention recall {s['recall']:.3f}, output relative error {s['rel_error']:.4f}; "
          f"dense layers {report.dense_layers or 'none'}; wrote {out / 'fidelity.json'}")


def cmd_bench(args: argparse.Namespace) -> None:
    if args.what == "kernels":
        from attnpatch.bench.kernels import main as kernels_main

        raise SystemExit(kernels_main(args.rest))


def _lm_eval_needs_essays(argv: list[str]) -> bool:
    """Help, listing and validation never build a RULER essay haystack: they skip its set-up."""
    return not ({"-h", "--help"} & set(argv)) and argv[:1] not in (["ls"], ["validate"])


def cmd_lm_eval(argv: list[str]) -> NoReturn:
    """Hand `argv` to lm-eval's CLI with model `attnpatch` registered."""
    if not argv or argv[0] in ("-h", "--help"):
        print(LM_EVAL_HELP, end="")
        raise SystemExit(0)
    try:
        from attnpatch.eval.lm_eval_plugin import main as lm_eval_main
    except ImportError as e:
        raise SystemExit(f"attnpatch lm-eval needs the eval extra (pip install 'attnpatch[eval]'): {e}") from e
    raise SystemExit(lm_eval_main(argv, essays=_lm_eval_needs_essays(argv)))


# -- parser -------------------------------------------------------------------------------------

def _sub(sub: argparse._SubParsersAction, name: str, help: str, description: str | None = None):
    return sub.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)


def _add_spec_args(p: argparse.ArgumentParser, method_default: str, decode: bool, backend: bool) -> None:
    from attnpatch.backends import BACKEND_NAMES

    p.add_argument("--method", default=method_default, metavar="SPEC",
                   help=f"prefill method: {_SPEC_HELP}, NAME one of {_names('prefill')}")
    if decode:
        p.add_argument("--decode", default="dense", metavar="SPEC",
                       help=f"decode method: {_SPEC_HELP}, NAME one of {_names('decode')}")
    if backend:
        p.add_argument("--backend", default="auto", choices=BACKEND_NAMES, help="kernels that run the methods")
    both = "; an option both methods declare: -o prefill.KEY=VALUE / -o decode.KEY=VALUE" if decode else ""
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                   help=f"a method option, repeatable (`attnpatch methods -v` lists them){both}")


def build_parser() -> argparse.ArgumentParser:
    from attnpatch.backends import BACKEND_NAMES
    from attnpatch.eval.suite import TASKS

    p = argparse.ArgumentParser(prog="attnpatch", description="Sparse attention for Hugging Face LLMs.",
                                epilog="`attnpatch COMMAND --help` shows a command's options and their defaults.",
                                formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    m = _sub(sub, "methods", "list the methods (per phase), their options and the backends")
    m.add_argument("-v", "--verbose", action="store_true", help="each option's help and allowed values")
    m.set_defaults(func=cmd_methods)

    d = _sub(sub, "demo", "passkey retrieval on the embedded checkpoint: dense vs a sparse method",
             "Passkey retrieval on one prompt: dense, then the given spec; prints answers, density, "
             "prefill time and the backends that ran.")
    d.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local HF directory or a hub id")
    _add_spec_args(d, DEMO_SPEC, decode=True, backend=True)
    d.add_argument("--length", type=int, default=4096, help="prompt length in tokens (about)")
    d.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1]")
    d.add_argument("--seed", type=int, default=0, help="seed of the passkey and the filler")
    d.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated for the answer")
    d.set_defaults(func=cmd_demo)

    ev = _sub(sub, "eval", "offline long-context suite: methods × lengths × tasks, one JSON per run",
              "Offline long-context suite on one model: every method spec × length runs every task, "
              "and each run writes one JSON (scores, density, backends, fidelity).")
    ev.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local HF directory or a hub id")
    ev.add_argument("--methods", nargs="+", default="dense,a_shape,blasst", metavar="SPEC",
                    help=f"prefill methods, space separated specs ({_SPEC_HELP}) or one comma separated "
                         f"list of names; NAME one of {_names('prefill')}")
    ev.add_argument("--decode", default="dense", metavar="SPEC",
                    help=f"decode method of every run: {_SPEC_HELP}, NAME one of {_names('decode')}")
    ev.add_argument("--backend", default="auto", choices=BACKEND_NAMES, help="kernels that run the methods")
    ev.add_argument("--tasks", nargs="+", default="passkey,perplexity,niah_single_1", metavar="TASK",
                    help=f"tasks, space or comma separated; one of {', '.join(TASKS)}")
    ev.add_argument("--lengths", nargs="+", default="2048,4096,8192", metavar="N",
                    help="context lengths in tokens, space or comma separated")
    ev.add_argument("--limit", type=int, default=4, help="samples per task")
    ev.add_argument("--max-gen-toks", type=int, default=None, metavar="N",
                    help="cap the RULER tasks' generated tokens (default: each task's own, 128 for NIAH)")
    ev.add_argument("--out", default="eval-results", help="folder for the result JSON files")
    ev.add_argument("-o", "--option", action="append", metavar="METHOD.KEY=VALUE",
                    help="an option for every run of one prefill method (repeatable), e.g. a_shape.local_blocks=4")
    ev.set_defaults(func=cmd_eval)

    ca = _sub(sub, "calibrate", "fit a method's per-head knob for a checkpoint; writes a profile JSON",
              "Records the Q/K/V every layer receives on a few prompts (one dense forward each), then per "
              "layer searches, for all heads at once, the sparsest value of the method's knob whose mean "
              "relative output error stays within --target-error (or whose density is nearest "
              "--target-density; --accuracy-floor searches the tolerance). blasst fits λ = a / L per phase "
              "instead. Use the profile with patch_model(model, METHOD, profile=PATH).")
    ca.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local HF directory or a hub id")
    ca.add_argument("--method", required=True, help="a prefill method with a per-head knob")
    _add_target_args(ca)
    ca.add_argument("--data", default="text",
                    help="'text', 'passkey', 'mixed' (the two alternated) or a JSONL file ({\"text\": ...} or "
                    "{\"prompt\": ..., \"answer\": ...} per line; with --hess the loss counts the answer "
                    "where there is one)")
    ca.add_argument("--samples", type=int, default=4, help="prompts per length")
    ca.add_argument("--lengths", nargs="+", default="4096", metavar="N", help="prompt lengths in tokens")
    ca.add_argument("--steps", type=int, default=8, help="bisection steps per layer")
    ca.add_argument("--lambda-fit", default="geomean", choices=("geomean", "every"),
                    help="blasst, error target: combine the prompts' best λ·L by their geometric mean (a typical "
                         "prompt within the target) or their minimum (every calibration prompt within it)")
    ca.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                    help="fix one of the method's other options (repeatable), e.g. block_size=64")
    hs = ca.add_argument_group("HeSS budgets", "--hess --target-density D: per-head sensitivity (LM-loss gradient × "
                               "sparsification error, one backward pass per prompt) and the knob redistributed "
                               "across heads at average density D; --target-error and --steps do not apply")
    hs.add_argument("--hess", action="store_true", help="HeSS redistribution instead of the error-target search")
    hs.add_argument("--grid", type=int, default=16, help="knob values evaluated per head")
    hs.add_argument("--form", default="fisher", choices=("fisher", "diagonal"),
                    help="Fisher ½Σ(g·e)² or its diagonal ½Σg²e²")
    hs.add_argument("--spread", type=int, default=None, metavar="STEPS",
                    help="keep every head within STEPS grid points of the uniform setting (default: anywhere)")
    hs.add_argument("--damping", type=float, default=0.0, metavar="DELTA",
                    help="damp the Fisher to g gᵀ + λI, λ = DELTA × its mean diagonal (default 0: undamped)")
    hs.add_argument("--scope", default="model", choices=("model", "layer"),
                    help="the average density holds over the whole model or in every layer")
    hs.add_argument("--uniform-out", default=None, metavar="PATH",
                    help="also write the uniform baseline (one knob value, same average density)")
    ca.add_argument("--name", default="", help="profile name (default: METHOD-errTARGET)")
    ca.add_argument("--out", default="profile.json", help="profile JSON file to write")
    ca.set_defaults(func=cmd_calibrate)

    _add_run_parser(sub)

    rp = _sub(sub, "report", "markdown + PNG from eval results (and a kernel benchmark JSON)")
    rp.add_argument("--results", default="eval-results", help="folder of `attnpatch eval` result JSON files")
    rp.add_argument("--bench", default=None, help="kernels.json from `attnpatch bench kernels` (optional)")
    rp.add_argument("--out", default="eval-results/report.md", help="markdown file; the PNG goes next to it")
    rp.set_defaults(func=cmd_report)

    i = _sub(sub, "inspect", "fidelity per layer/head (recall, output error, density) + heat maps",
             "Fidelity of a prefill method on one prompt, per layer and head: attention recall, output "
             "relative error, density (on the PyTorch reference backend), and heat maps.")
    i.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a local HF directory or a hub id")
    _add_spec_args(i, "a_shape", decode=False, backend=False)
    i.add_argument("--task", default="passkey", choices=("passkey", "austen"), help="where the prompt comes from")
    i.add_argument("--prompt", default=None, help="a prompt of your own instead of --task")
    i.add_argument("--length", type=int, default=2048, help="tokens (prompt truncated to it)")
    i.add_argument("--layers", default="0", help="layers to plot, comma separated")
    i.add_argument("--heads", default="0", help="heads to plot, comma separated")
    i.add_argument("--out", default="inspect-out", help="folder for fidelity.json and fidelity.png")
    i.set_defaults(func=cmd_inspect)

    b = _sub(sub, "bench", "benchmarks (GPU): `attnpatch bench kernels --help`")
    b.add_argument("what", choices=("kernels",), help="kernels: attnpatch's backends vs SDPA cuDNN/flash and "
                                                      "FlexAttention")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark (see its --help)")
    b.set_defaults(func=cmd_bench)
    # listed for --help only: `main` hands everything after `lm-eval` to lm-eval before parsing
    sub.add_parser("lm-eval", help="lm-eval's own CLI with model `attnpatch` registered; its --help "
                                   "lists the model_args", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # everything after it belongs to lm-eval (argparse's REMAINDER
        # drops a leading `--option`), so it bypasses attnpatch's parser
        cmd_lm_eval(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"attnpatch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
