"""``distill-jax`` command line: parse, then call library functions (nothing real lives here).

  distill-jax train CONFIG [key=value ...]     train (or resume) a student
  distill-jax cache CONFIG [key=value ...]     build (or resume) the teacher cache at teacher.cache
  distill-jax cache verify DIR                 check a teacher cache; non-zero exit on errors
  distill-jax eval CONFIG [key=value ...]      bits per byte, agreement and math exact match of
                                               teacher and student (eval.onpolicy: on-policy
                                               metrics) -> RUN_DIR/eval/eval_stepN.json
  distill-jax export RUN_DIR OUT_DIR           the trained student as a Hugging Face directory
                                               (LoRA: merged, or --lora adapter for PEFT's)
  distill-jax generate HF_DIR --prompt TEXT    sample from a checkpoint with the KV cache
  distill-jax convert-gguf GGUF OUT_DIR        GGUF (Llama) -> Hugging Face directory
  distill-jax mathgen --n N --out FILE         synthetic GSM8K-style problems as JSONL
  distill-jax traces CONFIG [key=value ...]    sample a teacher on prompts, verify, write traces
  distill-jax traces select TRACES --policy P  traces -> chat records (correct, shortest,
                                               majority, pairs) for training
  distill-jax data check CONFIG [key=value ...]  read and tokenize all the data; report bad records
  distill-jax demo                             the end-to-end demo on real assets
  distill-jax plan CONFIG [key=value ...]      per-device memory plan (no weights, no compiling)

Errors a command's input causes print as one line (exit status 2); --debug (or
DISTILL_JAX_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence


def _setup_jax() -> None:
    """Persistent compilation cache (recompiles drop from seconds to ~0.1 s)."""
    import jax
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                           os.path.join(os.path.expanduser("~"), ".cache", "distill_jax", "jax"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    init_distributed()


def init_distributed() -> None:
    """Join a multi-process run when the launcher asked for one (see launch/).

    ``DISTILL_JAX_COORDINATOR=host:port`` with ``DISTILL_JAX_NUM_PROCESSES`` and
    ``DISTILL_JAX_PROCESS_ID``: explicit (local multi-process, SLURM). ``DISTILL_JAX_DISTRIBUTED=1``:
    auto-detected by JAX (Cloud TPU pods, SLURM).
    """
    import jax
    coordinator = os.environ.get("DISTILL_JAX_COORDINATOR")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["DISTILL_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["DISTILL_JAX_PROCESS_ID"]))
    elif os.environ.get("DISTILL_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def _tokenizers(cfg):
    """The run's tokenizer, and the teacher's when the run is cross-tokenizer (else None)."""
    from distill_jax.tokenizer import load_tokenizer
    teacher = None
    if cfg.loss.cross_tokenizer and cfg.teacher is not None:
        teacher = load_tokenizer(cfg.teacher_tokenizer_path())
    return load_tokenizer(cfg.tokenizer_path()), teacher


def _cmd_train(args) -> int:
    from distill_jax.config import load_run_config
    from distill_jax.data import scan_records
    from distill_jax.train.loop import run
    cfg = load_run_config(args.config, args.overrides)
    tokenizer, teacher = _tokenizers(cfg)  # tokenizers, data files and the first records fail
    scan_records(cfg.data, tokenizer, teacher_tokenizer=teacher)  # before the run is written
    # the memory plan, before anything is compiled (plan.enforce=false trains anyway)
    if cfg.plan.enforce:
        from distill_jax.plan import PlanError, plan_run
        plan = plan_run(cfg)
        if not plan.fits:
            raise PlanError(plan.refusal())
    run(cfg)
    return 0


def _cmd_cache(args) -> int:
    if args.config == "verify":
        if len(args.overrides) != 1:
            print("usage: distill-jax cache verify DIR", file=sys.stderr)
            return 2
        from distill_jax.cache import verify
        r = verify(args.overrides[0])
        print(f"cache {args.overrides[0]}: {r.documents} documents ({r.missing_documents} missing), "
              f"{r.tokens} tokens, {r.bytes_per_token:.1f} bytes/token, k={r.k}: "
              f"{'ok' if r.ok else f'{len(r.errors)} errors'}")
        for e in r.errors:
            print(f"  error: {e}")
        return 0 if r.ok else 1
    from distill_jax.train.assemble import build_run_cache
    from distill_jax.config import load_run_config
    cfg = load_run_config(args.config, args.overrides)
    print(build_run_cache(cfg).summary())
    return 0


def _cmd_eval(args) -> int:
    from distill_jax.config import load_run_config
    from distill_jax.eval.run import main_eval
    cfg = load_run_config(args.config, args.overrides)
    models = args.models.split(",") if args.models else None
    main_eval(cfg, step=args.step, models=models)
    return 0


def _cmd_export(args) -> int:
    from distill_jax.export import export_run
    print(export_run(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype,
                     overwrite=args.overwrite, lora_as=args.lora))
    return 0


def _cmd_generate(args) -> int:
    from distill_jax import models
    from distill_jax.models.generate import generate_text
    from distill_jax.tokenizer import load_tokenizer
    model = models.load_hf(args.hf_dir, dtype=args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.hf_dir)
    texts = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          chat_template=args.chat, seed=args.seed)
    for prompt, text in zip(args.prompt, texts):
        print(f"### {prompt}\n{text}\n")
    return 0


def _cmd_convert_gguf(args) -> int:
    from distill_jax.models.gguf import gguf_to_hf
    out = gguf_to_hf(args.gguf, args.out_dir, dtype=args.dtype)
    print(out)
    return 0


def _cmd_mathgen(args) -> int:
    from distill_jax.data import mathgen
    return mathgen.main(args.rest) or 0


def _cmd_traces(args) -> int:
    if args.config == "select":  # its own argparse handles the flags
        from distill_jax.traces import selection
        return selection.main(args.overrides) or 0
    from distill_jax.traces.config import load_traces_config
    from distill_jax.traces.run import run_traces
    cfg = load_traces_config(args.config, args.overrides)
    print(run_traces(cfg).line())
    return 0


def _cmd_data_check(args) -> int:
    from distill_jax.config import load_run_config
    from distill_jax.data.check import main_check
    cfg = load_run_config(args.config, args.overrides)
    data_cfg = cfg.data
    if args.eval:
        if not cfg.eval.sources:
            raise ValueError("eval.sources is empty: nothing to check; set eval.sources=[{path: FILE}]")
        data_cfg = dataclasses.replace(data_cfg, sources=cfg.eval.sources,
                                       max_records=cfg.eval.max_documents)
    tokenizer, teacher = _tokenizers(cfg)
    report = main_check(data_cfg, tokenizer, teacher_tokenizer=teacher)
    return 0 if report.ok else 1


def _cmd_plan(args) -> int:
    from distill_jax.config import load_run_config
    from distill_jax.plan import plan_run
    cfg = load_run_config(args.config, args.overrides)
    plan = plan_run(cfg, devices=args.devices, device_kind=args.device_kind,
                    memory_gib=args.memory)
    print(plan.table())
    return 0 if plan.fits else 1


def _cmd_demo(args) -> int:
    from distill_jax import demo
    demo.main(args.run_dir, steps=args.steps, seed=args.seed,
              eval_documents=args.eval_documents, recipe=args.recipe)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill-jax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error (also: DISTILL_JAX_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume a student from a YAML run config")
    t.add_argument("config", help="YAML run config (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-4")
    t.set_defaults(fn=_cmd_train)

    ch = sub.add_parser("cache", help="build the teacher cache (or: cache verify DIR)")
    ch.add_argument("config", help="YAML run config, or 'verify'")
    ch.add_argument("overrides", nargs="*", help="dotted overrides (or the cache DIR after 'verify')")
    ch.set_defaults(fn=_cmd_cache)

    ev = sub.add_parser("eval", help="evaluate a run's teacher and student (held-out bits per "
                        "byte, agreement, math exact match; with eval.onpolicy=true the "
                        "student's completions of held-out prompts graded by the teacher)")
    ev.add_argument("config", help="YAML run config (see configs/)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.math=FILE")
    ev.add_argument("--step", type=int, default=None,
                    help="student checkpoint step (default: the latest)")
    ev.add_argument("--models", default=None,
                    help="comma-separated: teacher,student (default: both that exist)")
    ev.set_defaults(fn=_cmd_eval)

    e = sub.add_parser("export", help="export a run's student as a Hugging Face directory")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds a previous export (and nothing else)")
    e.add_argument("--lora", default="merged", choices=["merged", "adapter"],
                   help="a LoRA run: 'merged' folds the adapters into a plain Hugging Face "
                   "directory (default); 'adapter' writes a PEFT adapter directory "
                   "(adapter_config.json + adapter_model.safetensors) for the student's base")
    e.set_defaults(fn=_cmd_export)

    g = sub.add_parser("generate", help="generate text from a Hugging Face checkpoint")
    g.add_argument("hf_dir")
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    g.add_argument("--tokenizer", default=None, help="tokenizer dir (default: hf_dir)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32")
    g.set_defaults(fn=_cmd_generate)

    c = sub.add_parser("convert-gguf", help="convert a Llama GGUF file to a Hugging Face directory")
    c.add_argument("gguf")
    c.add_argument("out_dir")
    c.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    c.set_defaults(fn=_cmd_convert_gguf)

    m = sub.add_parser("mathgen", help="write synthetic math word problems as JSONL",
                       add_help=False)
    m.add_argument("rest", nargs=argparse.REMAINDER)
    m.set_defaults(fn=_cmd_mathgen)

    tr = sub.add_parser("traces", help="sample a teacher on prompts, verify every sample, write "
                        "a traces data set (or: traces select TRACES --policy P)")
    tr.add_argument("config", help="YAML traces config (see configs/traces_tiny.yaml), or "
                    "'select'")
    tr.add_argument("overrides", nargs=argparse.REMAINDER,
                    help="dotted overrides, e.g. samples=8 (after 'select': TRACES --policy P "
                    "[--max-per-prompt K] [--out FILE])")
    tr.set_defaults(fn=_cmd_traces)

    da = sub.add_parser("data", help="check a config's data: data check CONFIG [key=value ...]")
    dsub = da.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="read and tokenize every record; report bad records (file "
                         "and index), documents, tokens, empty and long documents; exit 1 on problems")
    dc.add_argument("config", help="YAML run config (see configs/)")
    dc.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_records=100")
    dc.add_argument("--eval", action="store_true", help="check eval.sources instead of data.sources")
    dc.set_defaults(fn=_cmd_data_check)

    pl = sub.add_parser("plan", help="per-device memory plan of a run (params, optimizer state, "
                        "gradients, activations, loss buffers, ...) from shapes and shardings; "
                        "exit 1 when it does not fit")
    pl.add_argument("config", help="YAML run config (see configs/)")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.grad_accum=4")
    pl.add_argument("--devices", type=int, default=None,
                    help="simulate a mesh of N devices (default: this machine's)")
    pl.add_argument("--device-kind", default=None,
                    help="v5e, v5p, v4, v6e, h100, h200, a100-80, a100-40 or cpu (host RAM); "
                    "default: plan.device_kind, else this machine's")
    pl.add_argument("--memory", type=float, default=None,
                    help="memory per device in GiB (overrides the kind's)")
    pl.set_defaults(fn=_cmd_plan)

    d = sub.add_parser("demo", help="run the end-to-end demo on real assets")
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    d.add_argument("--seed", type=int, default=0,
                   help="seed of the students' data order and init (runs under RUN_DIR/seed<N>)")
    d.add_argument("--eval-documents", type=int, default=None,
                   help="held-out paragraphs for bits per byte (default: the config's)")
    d.add_argument("--recipe", choices=["default", "on-policy"], default="default",
                   help="default: KD and ALM students vs their baselines; on-policy: one "
                        "on-policy (GKD) student vs the CE baseline")
    d.set_defaults(fn=_cmd_demo)
    return p


def _debug(argv: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` anywhere on the command line (or ``DISTILL_JAX_DEBUG=1``): show tracebacks."""
    flag = "--debug" in argv
    env = os.environ.get("DISTILL_JAX_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return flag or env, [a for a in argv if a != "--debug"]


def _report(command: str, err: BaseException) -> int:
    """Print ``err`` as one line on stderr; the exit status (2: the input, 1: a bug)."""
    from distill_jax.errors import is_user_error, one_line
    if is_user_error(err):
        print(f"distill-jax {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"distill-jax {command}: internal error: {type(err).__name__}: {one_line(err)} "
          "(run with --debug for the traceback)", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; errors are printed as one line (a traceback only with ``--debug``).

    Exit status: 0 done, 1 an unexpected error (a bug) or a failed check, 2 a problem with the
    input (bad config, missing file, bad data), 130 interrupted.
    """
    debug, argv = _debug(list(sys.argv[1:] if argv is None else argv))
    command = argv[0] if argv else "distill-jax"
    try:
        if argv[:1] == ["mathgen"]:  # its own argparse handles the flags
            from distill_jax.data import mathgen
            return mathgen.main(argv[1:]) or 0
        args = build_parser().parse_args(argv)
        if args.command == "data" or (args.command, getattr(args, "config", None)) in (
                ("cache", "verify"), ("traces", "select")):
            command = " ".join(argv[:2])
        _setup_jax()
        return args.fn(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"distill-jax {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if debug:
            raise
        return _report(command, e)
    finally:
        _close_resources()


def _close_resources() -> None:
    """Finish what an interrupted command left running (asynchronous checkpoint saves), so
    nothing fails noisily at interpreter exit."""
    checkpoint = sys.modules.get("distill_jax.checkpoint")
    if checkpoint is not None:
        try:
            checkpoint.close_all()
        except Exception as e:  # noqa: BLE001 - already reporting the error that got us here
            print(f"distill-jax: warning: closing checkpoints: {type(e).__name__}: {e}",
                  file=sys.stderr)


if __name__ == "__main__":
    from absl import flags  # Grain worker processes need absl flags parsed
    flags.FLAGS(sys.argv[:1], known_only=True)
    sys.exit(main())
