"""The ``lmforge`` command line: one verb per stage, one function per verb.

Heavy imports happen inside the verbs so that ``lmforge --help`` is instant. Bad input raises
:class:`~lmforge.errors.UserError`, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.errors import UserError

VERBS = ["prepare", "train", "eval", "predict", "generate", "embed", "serve", "chat", "quickstart", "import-hf", "export-hf", "bench", "support"]


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def _emit(args, obj: dict, text) -> int:
    """The command's result: ``obj`` as JSON with ``--json``, else ``text(obj)``; exit code 0."""
    print(json.dumps(obj, indent=2) if args.json else text(obj))
    return 0


def _or(value, default):
    """``value`` unless the option was not given (``0`` is a value, not a missing option)."""
    return default if value is None else value


# ---------------------------------------------------------------------------------------- prepare
def cmd_prepare(args) -> int:
    """Clean a corpus, train a BPE tokenizer and write token files."""
    from lmforge.data.prepare import prepare

    meta = prepare(args.input, args.out, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                   seed=args.seed, text_field=args.text_field, text_column=args.text_column,
                   tokenizer=args.tokenizer)
    if args.json:
        _print_json({**meta, "data_dir": str(args.out)})
    else:
        s = meta["splits"]
        print(f"prepared {args.out}: {meta['documents']:,} documents, {meta['bytes']:,} bytes -> "
              f"{meta['tokens']:,} tokens ({meta['bytes_per_token']} bytes/token); "
              f"train {s['train']['tokens']:,} / val {s['val']['tokens']:,} tokens; "
              f"{len(meta['skipped'])} skipped; vocabulary {meta['vocab_size']:,}")
    return 0


# ------------------------------------------------------------------------------------------ train
def _train_config(args):
    from lmforge import config as cfgmod

    overrides = list(args.set or [])
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.max_seconds is not None:
        overrides.append(f"train.max_seconds={args.max_seconds}")
        if args.max_steps is None and not args.resume:
            overrides.append("train.max_steps=null")  # plan the schedule to fit the budget
    if args.resume:
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume: no checkpoint in {args.out}")
        if args.preset or args.config:
            raise UserError("--resume continues the saved config; --preset/--config cannot change it")
        data = cfgmod.load_yaml(saved)
        cfg = cfgmod.from_dict(data, str(saved))
        if overrides:
            patch = cfgmod.parse_overrides(overrides)
            if "model" in patch:
                raise UserError("--resume cannot change model.* settings")
            cfgmod.apply_dict(cfg, patch, "--set")
            cfgmod.validate(cfg)
        return cfg
    return cfgmod.build_config(args.preset, args.config, overrides)


def cmd_train_classify(args) -> int:
    from lmforge.train.classify import train_classifier

    if not args.init or not args.data:
        raise UserError("--task classify needs --init RUN_OR_HF_DIR and --data FILE (.csv or .jsonl)")
    if args.resume or args.preset or args.config or args.stop_at:
        raise UserError("--task classify does not take --resume, --preset, --config or --stop-at")
    overrides = list(args.set or []) + ([f"train.max_steps={args.max_steps}"] if args.max_steps else [])
    s = train_classifier(args.init, args.data, args.out, val=args.val, val_fraction=args.val_fraction, test=args.test,
                         text_column=args.text_column, label_column=args.label_column, class_weights=args.class_weights,
                         oversample=args.oversample, early_stop=args.early_stop, patience=args.patience,
                         epochs=args.epochs, max_length=args.max_length, overrides=overrides,
                         max_seconds=args.max_seconds)
    if args.json:
        _print_json(s)
    else:
        v = s["validation"]
        print(f"fine-tuned {s['run_dir']}: {s['arch']} classifier, {len(s['labels'])} classes, "
              + (f"best step {s['best_step']}/{s['steps']} ({s['stopped_by']}); validation accuracy "
                 f"{v['accuracy']:.4f}, macro F1 {v['macro_f1']:.4f}" if v else
                 f"{s['steps']} steps ({s['stopped_by']}), no validation: last weights kept")
              + (f"; test macro F1 {s['test']['macro_f1']:.4f}" if "test" in s else ""))
        if (Path(s["run_dir"]) / "report.md").is_file():  # no validation and no --test: nothing to report on
            print(f"report: {Path(s['run_dir']) / 'report.md'}")
    return 0


def cmd_train(args) -> int:
    """Train (or --resume) a GPT on a prepared data directory; or, with --task classify,
    fine-tune a classifier from --init on a labelled CSV/JSONL file."""
    from lmforge.train.trainer import train

    if args.task == "classify":
        return cmd_train_classify(args)

    cfg = _train_config(args)
    if args.task == "mlm" and cfg.arch != "bert":
        raise UserError("--task mlm trains an encoder: use a BERT preset (bert-debug, bert-mini, bert-base)")
    if args.task == "lm" and cfg.arch == "bert" and not args.resume:
        raise UserError(f"{cfg.preset or 'this config'} is an encoder: train it with --task mlm")
    data_dir = args.data
    if data_dir is None:
        if not args.resume:
            raise UserError("--data is required (a directory made by `lmforge prepare`)")
        data_dir = json.loads((Path(args.out) / "trainer_state.json").read_text())["data_dir"]
    summary = train(cfg, data_dir, args.out, resume=args.resume, stop_at=args.stop_at)
    if summary.get("rank", 0) != 0:  # under torchrun, process 0 speaks for all
        return 130 if summary["stopped_by"] == "interrupted" else 0
    if args.json:
        _print_json(summary)
    else:
        val = f"{summary['val_loss']:.4f}" if summary["val_loss"] is not None else "n/a"
        print(f"trained {summary['run_dir']}: step {summary['step']}/{summary['max_steps']} "
              f"({summary['stopped_by']}), val_loss {val}, {summary['tokens_seen']:,} tokens, "
              f"{summary['tokens_per_second']:,.0f} tokens/s, {summary['params']:,} params")
    if summary["stopped_by"] == "interrupted":
        print(f"interrupted at step {summary['step']}: checkpoint saved; continue with "
              f"`lmforge train --out {args.out} --resume`", file=sys.stderr)
        return 130
    return 0


# ------------------------------------------------------------------------------------------- eval
def _load_classifier(run_dir):
    from lmforge.runs import load_run

    run = load_run(run_dir)
    if not getattr(run.model.config, "num_labels", 0):
        return run, None
    return run, json.loads((run.path / "labels.json").read_text(encoding="utf-8"))


def cmd_eval_classify(args, run, names) -> int:
    from lmforge.data.labeled import read_examples
    from lmforge.train.classify import write_classification_report

    if not args.data:
        raise UserError("a classifier is evaluated on a labelled file: --data FILE (.csv or .jsonl)")
    ex = read_examples(args.data, args.text_column, args.label_column)
    m = write_classification_report(run.path, run.model, run.tokenizer, ex, names, args.max_length, run.device,
                                    "eval", source=str(args.data))
    if args.json:
        _print_json(m)
    else:
        print(f"accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}  weighted F1 {m['weighted_f1']:.4f}  "
              f"ROC-AUC {m['roc_auc']:.4f}  ({m['n']} examples; largest class {m['majority_baseline_accuracy']:.4f})"
              if m["roc_auc"] is not None else f"accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}")
        print(f"report: {run.path / 'report.md'} (plots/confusion.png, plots/roc.png, plots/pr.png)")
    return 0


def cmd_eval_mlm(args) -> int:
    """Masked-token loss and accuracy of an encoder run on its data directory's validation split."""
    from lmforge.data.tokens import TokenFile, load_meta
    from lmforge.runs import load_run
    from lmforge.train.trainer import Objective, autocast_for, estimate_val

    run = load_run(args.run_dir)
    if args.data is None:
        state = run.path / "trainer_state.json"
        if not state.is_file():
            raise UserError(f"{args.run_dir} was not trained here; give --data DATA_DIR (WordPiece)")
        args.data = json.loads(state.read_text())["data_dir"]
    meta = load_meta(args.data)
    val = TokenFile(Path(args.data) / "val.bin", meta["dtype"])
    val.check_context(run.model.config.block_size)
    m = estimate_val(run.model, val, run.config, autocast_for(run.device, "auto"), Objective(run.config, meta, run.device),
                     batches=50)
    m.update(run_dir=str(args.run_dir), data=str(args.data))
    if args.json:
        _print_json(m)
    else:
        print(f"masked-token loss {m['val_loss']:.4f}  accuracy {m['val_mlm_accuracy']:.4f}  "
              f"(50 validation batches of {args.data})")
    return 0


def cmd_predict(args) -> int:
    """Label and class probabilities for each --text (or each line of --input) from a classifier run."""
    from lmforge.train.classify import predict_probs

    texts = _input_texts(args)
    run, names = _load_classifier(args.run_dir)
    if names is None:
        raise UserError(f"{args.run_dir} is not a classifier run (train one with --task classify)")
    probs = predict_probs(run.model, run.tokenizer, texts, min(args.max_length, run.model.config.block_size),
                          run.device)
    rows = [{"text": t, "label": names[int(p.argmax())],
             "probabilities": {n: float(x) for n, x in zip(names, p)}} for t, p in zip(texts, probs)]
    if args.json:
        _print_json({"predictions": rows})
    else:
        for r in rows:
            top = ", ".join(f"{n} {x:.3f}" for n, x in sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:3])
            print(f"{r['label']}\t{top}\t{r['text'][:60]!r}")
    return 0


def cmd_eval(args) -> int:
    """Validation loss, perplexity, bits per byte and the lzma baseline; writes report.md. For a
    classifier run: accuracy, precision/recall/F1, ROC-AUC, confusion matrix and plots on --data."""
    from lmforge.evaluate.run import evaluate_run

    run_dir = Path(args.run_dir)
    if (run_dir / "labels.json").is_file():
        run, names = _load_classifier(run_dir)
        if names is not None:
            return cmd_eval_classify(args, run, names)
    if (run_dir / "config.yaml").is_file():
        from lmforge import config as cfgmod

        if cfgmod.load(run_dir / "config.yaml").arch == "bert":
            return cmd_eval_mlm(args)

    m = evaluate_run(args.run_dir, args.data, args.batch_size, args.max_tokens, samples=args.samples,
                     stride=args.stride, dynamic=args.dynamic or args.dynamic_lr is not None,
                     dynamic_lr=args.dynamic_lr)
    if args.json:
        _print_json(m)
    else:
        verdict = "beats" if m["val_bpb"] < m["lzma_bpb"] else "does not beat"
        print(f"val_loss {m['val_loss']:.4f}  val_ppl {m['val_ppl']:.2f}  val_bpb {m['val_bpb']:.4f}  "
              f"lzma_bpb {m['lzma_bpb']:.4f}  ({m['val_tokens']:,} tokens, {m['val_bytes']:,} bytes; "
              f"the model {verdict} lzma)")
        if "dynamic_val_bpb" in m:
            print(f"dynamic evaluation (adapting as it reads, like lzma): val_bpb {m['dynamic_val_bpb']:.4f}")
        print(f"report: {Path(args.run_dir) / 'report.md'}")
    return 0


# --------------------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    """Stream a continuation of --prompt to stdout."""
    from lmforge.data.tokenizer import eot_id
    from lmforge.generate import stream_text
    from lmforge.runs import load_run

    if args.max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be positive")
    if args.temperature < 0:
        raise UserError("--temperature must be >= 0 (0 is greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    run = load_run(args.run_dir)
    sys.stdout.write(args.prompt)
    for piece in stream_text(run.model, run.tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                             args.top_k, args.top_p, args.seed, args.stop, eot_id(run.tokenizer),
                             compile=args.compile):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _input_texts(args) -> list[str]:
    """Texts from repeated --text and from --input: a .csv/.jsonl file (its --text-column) or a
    plain UTF-8 file with one text per line."""
    texts = list(args.text or [])
    if args.input:
        from lmforge.data.labeled import read_examples

        path = Path(args.input)
        if not path.is_file():
            raise UserError(f"input file not found: {path}")
        if path.suffix.lower() in (".csv", ".jsonl"):
            texts += read_examples(path, args.text_column, None).texts
        else:
            try:
                texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError:
                raise UserError(f"{path} is not UTF-8 text") from None
    if not texts:
        raise UserError("give at least one --text (or --input FILE)")
    return texts


# ------------------------------------------------------------------------------------------ embed
def cmd_embed(args) -> int:
    """Sentence embeddings from an encoder run: mean of the last hidden states, L2-normalised."""
    from lmforge.embed import embed_texts
    from lmforge.runs import load_run

    texts = _input_texts(args)
    run = load_run(args.run_dir)
    if run.config.arch != "bert":
        raise UserError(f"embed needs an encoder run (arch bert); {args.run_dir} is a {run.config.arch} run")
    vectors = embed_texts(run.model, run.tokenizer, texts, batch_size=args.batch_size).tolist()
    if args.json:
        print(json.dumps({"model": str(args.run_dir), "dim": len(vectors[0]), "embeddings": vectors}))
    else:
        for text, v in zip(texts, vectors):
            head = ", ".join(f"{x:+.4f}" for x in v[:6])
            print(f"{text[:40]!r:<44} [{head}, ...] ({len(v)} dims)")
    return 0


# ------------------------------------------------------------------------------------------ serve
def cmd_serve(args) -> int:
    """Serve a run directory behind an OpenAI-compatible HTTP API."""
    import os

    from lmforge.serve.app import serve

    key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.max_tokens_cap <= 0:
        raise UserError("--max-tokens-cap must be positive")
    if args.max_concurrency <= 0 or args.max_batch <= 0:
        raise UserError("--max-concurrency and --max-batch must be positive")
    print(f"lmforge serve: {args.run_dir} on http://{args.host}:{args.port}/ (chat page; API under /v1) "
          f"({'API key required' if key else 'no API key'})", file=sys.stderr, flush=True)
    serve(args.run_dir, args.host, args.port, key, args.max_tokens_cap, args.max_concurrency, args.max_batch,
          args.compile)
    return 0


# ------------------------------------------------------------------------------------------- chat
def cmd_chat(args) -> int:
    """Chat with a GPT run in the terminal (the run's chat template, answers streamed as they come).
    Reads one user turn per line; /reset starts a new conversation, /quit or Ctrl-D ends."""
    from lmforge.chat import chat_loop

    if not 0 <= args.temperature <= 2:
        raise UserError(f"--temperature must be in 0..2, got {args.temperature}")
    if args.max_tokens <= 0:
        raise UserError("--max-tokens must be positive")
    return chat_loop(args.run_dir, args.temperature, args.max_tokens, args.system, args.seed, args.top_p,
                     compile=args.compile)


# ------------------------------------------------------------------------------------- quickstart
def cmd_quickstart(args) -> int:
    """Prepare the embedded corpus, train a GPT within a time budget, evaluate and sample it."""
    from lmforge.quickstart import CLASSIFY_DEFAULT_SECONDS, quickstart, quickstart_classify

    if args.task == "classify":
        out = args.out if args.out != "runs/quickstart" else "runs/quickstart-classify"
        r = quickstart_classify(out, max_seconds=_or(args.max_seconds, CLASSIFY_DEFAULT_SECONDS), init=args.init,
                                folds=args.folds)
        if args.json:
            _print_json(r)
        else:
            b = r["baselines"]
            print()
            print(f"lmforge quickstart --task classify: {r['task']} ({len(r['labels'])} packages, "
                  f"{r['examples']:,} docstrings; {r['folds']}-fold cross-validation by file: each docstring "
                  "predicted by a model that never saw its file)")
            print(f"  {'model':<34} {'accuracy':>9} {'macro F1':>9}")
            print(f"  {'fine-tuned encoder':<34} {r['test']['accuracy']:>9.4f} {r['test']['macro_f1']:>9.4f}")
            for name, m in b.items():
                print(f"  {name.replace('_', ' '):<34} {m['accuracy']:>9.4f} {m['macro_f1']:>9.4f}")
            for name, c in r["versus_baselines"].items():
                lo, hi = c["ci95"]
                verdict = ("not significant" if c["mcnemar_p"] >= 0.05 else
                           "ahead, significant" if c["accuracy_difference"] > 0 else "behind, significant")
                print(f"  accuracy vs {name.replace('_', ' ')}: {100 * c['accuracy_difference']:+.1f} points "
                      f"(95% interval {100 * lo:+.1f} to {100 * hi:+.1f}; McNemar p = {c['mcnemar_p']:.2g}, "
                      f"{verdict} at 5%)")
            print(f"  run directory   {r['run_dir']} (the first fold's classifier; report.md, plots/crossval/)")
            print(f"  total time      {r['total_seconds']:.0f} s")
        return 0
    summary = quickstart(args.out, max_seconds=_or(args.max_seconds, 300.0), preset=args.preset,
                         vocab_size=args.vocab_size)
    if args.json:
        _print_json(summary)
    else:
        print()
        print(f"lmforge quickstart: {summary['params']:,}-parameter GPT trained on the Python standard library")
        print(f"  tokens seen     {summary['tokens_seen']:,} ({summary['tokens_per_second']:,.0f} tokens/s, "
              f"{summary['train_seconds']:.0f} s)")
        print(f"  val loss        {summary['val_loss']:.4f} nats/token (perplexity {summary['val_ppl']:.1f})")
        print(f"  val bits/byte   {summary['val_bpb']:.4f}   lzma -9e on the same text: {summary['lzma_bpb']:.4f}")
        print(f"  sample          {summary['samples'][0][:200]!r}")
        print(f"  run directory   {summary['run_dir']} (report.md, plots/loss.png)")
        print(f"  total time      {summary['total_seconds']:.0f} s")
    return 0


# ------------------------------------------------------------------------------------------ bench
def cmd_bench(args) -> int:
    """Benchmark lmforge's GPT against Hugging Face transformers GPT-2 in the same run."""
    from lmforge import bench
    from lmforge import config as cfgmod
    from lmforge.train.trainer import resolve_device

    if args.what == "serve":
        return cmd_bench_serve(args)
    cfg = cfgmod.build_config(args.preset, None, args.set or [])
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = 50304 if args.preset == "gpt2-124m" else 8192
    device = str(resolve_device(args.device))
    loss_chunk = cfgmod.loss_chunk_for(cfg.train.loss_chunk, device.split(":")[0])
    batch = args.batch_size
    if batch is None:
        batch = 1 if args.what == "generate" else cfg.train.batch_size if args.preset else 8
    for name, v in (("--batch-size", batch), ("--steps", args.steps), ("--rounds", args.rounds)):
        if v is not None and v <= 0:
            raise UserError(f"{name} must be positive, got {v}")
    if not bench.reference_available():
        print("transformers is not installed: benchmarking lmforge alone", file=sys.stderr)
    if args.what == "train":
        result = bench.bench_train(cfg.model, batch, steps=args.steps, rounds=args.rounds, device=device,
                                   compile=args.compile, dtype=cfg.train.dtype, loss_chunk=loss_chunk,
                                   activation_checkpointing=cfg.train.activation_checkpointing,
                                   reference=not args.no_reference)
    else:
        if args.new_tokens is None:
            args.new_tokens = min(256, cfg.model.block_size - args.prompt_tokens)
        if args.new_tokens <= 0 or args.prompt_tokens <= 0:
            raise UserError("--new-tokens and --prompt-tokens must be positive")
        if args.prompt_tokens + args.new_tokens > cfg.model.block_size:
            raise UserError(f"--prompt-tokens + --new-tokens ({args.prompt_tokens + args.new_tokens}) exceed "
                            f"the context ({cfg.model.block_size})")
        result = bench.bench_generate(cfg.model, batch, args.prompt_tokens, args.new_tokens, rounds=args.rounds,
                                      device=device, dtype=cfg.train.dtype, compile=args.compile,
                                      reference=not args.no_reference, reference_cache=args.reference_cache,
                                      reference_dtype=args.reference_dtype)
    return _emit(args, result, bench.format_result)


def cmd_bench_serve(args) -> int:
    """lmforge serve under load: requests/s, tokens/s, time to first token and per-token latency
    at each concurrency level, and the speed-up of concurrent over sequential requests."""
    from lmforge import bench

    try:
        levels = sorted({int(x) for x in args.concurrency.split(",")})
    except ValueError:
        raise UserError(f"--concurrency takes numbers separated by commas, got {args.concurrency!r}") from None
    if not levels or levels[0] <= 0 or args.requests <= 0 or args.max_tokens <= 0:
        raise UserError("--concurrency levels, --requests and --max-tokens must be positive")
    if not (Path(args.run_dir) / "config.yaml").is_file():
        raise UserError(f"not a run directory (no config.yaml): {args.run_dir}")
    result = bench.bench_serve(args.run_dir, levels, args.requests, args.max_tokens, compile=args.compile)
    return _emit(args, result, bench.format_serve_result)


# ---------------------------------------------------------------------------------------- support
SUPPORT_DATA = Path(__file__).parent / "apps" / "support" / "data"


def _support_summary(r: dict) -> str:
    if r.get("handoff_precision") is None:
        return f"top-1 {r['top1']:.3f}, MRR@5 {r['mrr5']:.3f} on {r['n_questions']} questions (none uncovered: threshold kept)"
    return (f"top-1 {r['top1']:.3f}, MRR@5 {r['mrr5']:.3f} on {r['n_covered']} covered questions; handoff on "
            f"{r['n_uncovered']} uncovered: precision {r['handoff_precision']:.3f}, recall {r['handoff_recall']:.3f} "
            f"at threshold {r['threshold']:.3f} (5-fold cross-validated: {r['handoff_precision_cv']:.3f} / "
            f"{r['handoff_recall_cv']:.3f})")


def cmd_support(args) -> int:
    """The customer-service assistant: build it from an FAQ, evaluate it, serve it, export conversations."""
    import os

    from lmforge.apps.support.privacy import parse_kinds

    if args.action in ("init", "quickstart"):
        from lmforge.apps.support.assistant import init_app

        faq = SUPPORT_DATA / "faq.jsonl" if args.action == "quickstart" else args.faq
        columns = None if args.action == "quickstart" else {
            "question_column": args.question_column, "answer_column": args.answer_column,
            "id_column": args.id_column, "category_column": args.category_column}
        r = init_app(faq, args.out, args.encoder, parse_kinds(args.mask) if args.mask else None, columns)
        if args.action == "quickstart":
            from lmforge.apps.support.evaluate import evaluate_support

            r["eval"] = evaluate_support(args.out, SUPPORT_DATA / "questions.jsonl")
            r["eval"].pop("questions")
        if args.json:
            _print_json(r)
        else:
            print(f"support app {r['app_dir']}: {r['entries']} FAQ entries ({r['added']} added, {r['changed']} changed, "
                  f"{r['removed']} removed, {r['unchanged']} unchanged); masking {', '.join(r['mask']) or 'off'}")
            if "eval" in r:
                print("evaluated on the built-in questions: " + _support_summary(r["eval"]))
            print(f"serve it: lmforge support serve {r['app_dir']} --agent-key KEY   (customer page /, agents /agent)")
        return 0
    if args.action == "eval":
        from lmforge.apps.support.evaluate import evaluate_support

        r = evaluate_support(args.app_dir, args.questions, save=not args.no_save)
        if args.json:
            _print_json(r)
        else:
            for q in r["questions"]:
                miss = q["expected"] != "none" and (not q["top"] or q["top"][0] not in q["expected"])
                if miss:
                    print(f"  miss: {q['question']!r} -> {q['top'][:1]} (expected {q['expected']})")
            print(_support_summary(r) + ("; threshold saved" if r["threshold_saved"] else ""))
        return 0
    if args.action == "export":
        from lmforge.apps.support.assistant import Assistant
        from lmforge.apps.support.store import NotFound
        from lmforge.fsutil import write_json

        assistant = Assistant(args.app_dir)
        try:
            ids = [args.conversation] if args.conversation else \
                [c["id"] for c in assistant.history(args.customer)["conversations"]] if args.customer else None
            if ids is None:
                raise UserError("export needs --conversation ID or --customer ID")
            out = {"conversations": [assistant.export(i) for i in ids]}
        except (NotFound, ValueError) as e:
            raise UserError(str(e)) from None
        if args.out:
            write_json(args.out, out)
            print(f"exported {len(ids)} conversation(s) to {args.out}", file=sys.stderr)
        else:
            _print_json(out)
        return 0
    # serve
    from lmforge.apps.support.app import serve

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.max_concurrency <= 0:
        raise UserError("--max-concurrency must be positive")
    if not (Path(args.app_dir) / "support.sqlite").is_file():
        raise UserError(f"not a support app directory (no support.sqlite): {args.app_dir}")
    key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    agent_key = args.agent_key or os.environ.get("LMFORGE_AGENT_KEY") or None
    print(f"lmforge support: {args.app_dir} on http://{args.host}:{args.port}/ (agents: /agent)", file=sys.stderr,
          flush=True)
    serve(args.app_dir, args.host, args.port, key, agent_key, args.generate, args.max_concurrency)
    return 0


# -------------------------------------------------------------------------- import-hf / export-hf
def cmd_import_hf(args) -> int:
    """Turn a Hugging Face GPT-2 directory (config.json, weights, tokenizer) into a run directory."""
    from lmforge.models.hf import import_hf

    return _emit(args, import_hf(args.hf_dir, args.out), lambda info: (
        f"imported {args.hf_dir} -> {info['run_dir']}: {info['model_type']}, {info['params']:,} params, "
        f"{info['n_layer']} layers x {info['n_embd']}, context {info['block_size']}, "
        f"vocabulary {info['vocab_size']:,}"))


def cmd_export_hf(args) -> int:
    """Write a run directory as a Hugging Face directory that transformers loads with from_pretrained."""
    from lmforge.models.hf import export_hf

    return _emit(args, export_hf(args.run_dir, args.out), lambda info: (
        f"exported {args.run_dir} -> {info['hf_dir']} ({info['architecture']}, {info['params']:,} params)"))


DECODE_COMPILE_HELP = ("fuse the decode step with torch.compile: on the CPU about twice the tokens/s at batch 1, "
                       "after ~10-20 s of compiling per batch size (default off)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="From raw text to a trained, evaluated and "
                                "sampled language model.")
    p.add_argument("--version", action="version", version=f"lmforge {__import__('lmforge').__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    s = sub.add_parser("prepare", help="clean a corpus, train a tokenizer, write token files",
                       description=cmd_prepare.__doc__)
    s.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories, globs (.txt .md .py .jsonl .csv), or 'stdlib' for the embedded corpus")
    s.add_argument("--out", required=True, help="data directory to write")
    s.add_argument("--vocab-size", type=int, default=4096)
    s.add_argument("--tokenizer", choices=["bpe", "wordpiece"], default="bpe",
                   help="byte-level BPE (decoders) or WordPiece with [CLS] [SEP] [PAD] [MASK] [UNK] (encoders)")
    s.add_argument("--val-fraction", type=float, default=0.05)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--text-field", default="text", help="JSONL field holding the text")
    s.add_argument("--text-column", default="text", help="CSV column holding the text")
    s.add_argument("--json", action="store_true", help="print meta.json as JSON")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="train or resume a GPT", description=cmd_train.__doc__)
    s.add_argument("--data", help="data directory from `lmforge prepare` (recorded in the run on --resume)")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--preset", help="debug, nano, micro, gpt2-124m; encoders: bert-debug, bert-mini, bert-base")
    s.add_argument("--config", help="YAML file with model: and train: sections")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4 (repeatable)")
    s.add_argument("--max-steps", type=int, help="length of the schedule in optimizer steps")
    s.add_argument("--max-seconds", type=float, help="time budget; without --max-steps the schedule is planned to fit it")
    s.add_argument("--stop-at", type=int, help="stop this invocation at this step (checkpointed; --resume continues)")
    s.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    s.add_argument("--json", action="store_true")
    c = s.add_argument_group("classification (--task classify)")
    c.add_argument("--task", choices=["lm", "mlm", "classify"], default="lm",
                   help="lm: next-token (GPT); mlm: masked-token (BERT presets); classify: fine-tune a classifier")
    c.add_argument("--init", help="run directory or Hugging Face directory to fine-tune")
    c.add_argument("--val", help="validation file (default: a stratified --val-fraction of --data)")
    c.add_argument("--val-fraction", type=float, default=0.15,
                   help="without --val: the share of --data held out, stratified, to pick the best checkpoint "
                   "(0: no validation; every epoch runs and the last weights are kept)")
    c.add_argument("--test", help="test file, evaluated once with the best checkpoint")
    c.add_argument("--text-column", default="text")
    c.add_argument("--label-column", default="label")
    c.add_argument("--class-weights", choices=["auto", "none"], help="auto: inverse class frequency in the loss")
    c.add_argument("--oversample", action="store_true", help="class-balanced sampling of training examples")
    c.add_argument("--early-stop", default="macro_f1", help="validation metric that picks the best checkpoint "
                   "(macro_f1, accuracy, weighted_f1, roc_auc, loss)")
    c.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
    c.add_argument("--epochs", type=int, default=3)
    c.add_argument("--max-length", type=int, default=128, help="tokens per text (longer texts are truncated)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="validation loss, perplexity, bits/byte vs lzma; report.md",
                       description=cmd_eval.__doc__)
    s.add_argument("run_dir")
    s.add_argument("--data", help="data directory (default: the one the run was trained on)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-tokens", type=int, help="score at most this many validation tokens")
    s.add_argument("--stride", type=int, help="tokens between window starts (default: the context length, i.e. "
                   "consecutive windows; smaller gives each token more context at more cost)")
    s.add_argument("--samples", type=int, default=3, help="samples to put in report.md (0-3)")
    s.add_argument("--dynamic", action="store_true", help="also dynamic evaluation: one Adam step on each window "
                   "after scoring it, so the model adapts to the text as lzma does (dynamic_val_bpb)")
    s.add_argument("--dynamic-lr", type=float, help="Adam learning rate for --dynamic (default 1e-4)")
    s.add_argument("--text-column", default="text", help="classifier runs: text column of --data")
    s.add_argument("--label-column", default="label", help="classifier runs: label column of --data")
    s.add_argument("--max-length", type=int, default=128, help="classifier runs: tokens per text")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("predict", help="labels and probabilities from a classifier run",
                       description=cmd_predict.__doc__)
    s.add_argument("run_dir")
    s.add_argument("--text", action="append", help="a text to classify (repeatable)")
    s.add_argument("--input", help="a .csv/.jsonl file (--text-column) or a text file, one text per line")
    s.add_argument("--text-column", default="text")
    s.add_argument("--max-length", type=int, default=128)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("generate", help="stream a continuation of a prompt", description=cmd_generate.__doc__)
    s.add_argument("run_dir")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", metavar="STR", help="stop before this string (repeatable)")
    s.add_argument("--compile", action="store_true", help=DECODE_COMPILE_HELP)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("embed", help="sentence embeddings from an encoder run", description=cmd_embed.__doc__)
    s.add_argument("run_dir")
    s.add_argument("--text", action="append", help="a text to embed (repeatable)")
    s.add_argument("--input", help="a .csv/.jsonl file (--text-column) or a text file, one text per line")
    s.add_argument("--text-column", default="text")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--json", action="store_true", help='print {"embeddings": [[...], ...]}')
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API over a run directory", description=cmd_serve.__doc__)
    s.add_argument("run_dir")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                   "(default: $LMFORGE_API_KEY)")
    s.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask for")
    s.add_argument("--max-concurrency", type=int, default=16,
                   help="requests in flight at once; more are answered 429 (not queued)")
    s.add_argument("--max-batch", type=int, default=16,
                   help="sequences decoded together (continuous batching); more wait for a free slot")
    s.add_argument("--compile", action="store_true", help=DECODE_COMPILE_HELP + "; all batch sizes are "
                   "compiled before the server answers")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("chat", help="chat with a GPT run in the terminal", description=cmd_chat.__doc__)
    s.add_argument("run_dir")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-p", type=float)
    s.add_argument("--max-tokens", type=int, default=200)
    s.add_argument("--system", help="a system message opening every conversation")
    s.add_argument("--seed", type=int)
    s.add_argument("--compile", action="store_true", help=DECODE_COMPILE_HELP)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("quickstart", help="the whole path on the embedded corpus within a time budget",
                       description=cmd_quickstart.__doc__)
    s.add_argument("--out", default="runs/quickstart", help="run directory (replaced if it is an old quickstart run)")
    s.add_argument("--max-seconds", type=float, help="total time budget (default 300; --task classify: 600)")
    s.add_argument("--preset", default="micro")
    s.add_argument("--vocab-size", type=int, default=4096)
    s.add_argument("--task", choices=["lm", "classify"], default="lm",
                   help="classify: fine-tune an encoder to tell a docstring's stdlib package, beside baselines")
    s.add_argument("--init", help="--task classify: encoder to fine-tune (default: all-MiniLM-L6-v2)")
    s.add_argument("--folds", type=int, default=3, help="--task classify: folds of the cross-validation by file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_quickstart)

    s = sub.add_parser("import-hf", help="Hugging Face GPT-2 directory -> run directory",
                       description=cmd_import_hf.__doc__)
    s.add_argument("hf_dir", help="config.json + model.safetensors (or pytorch_model.bin) + tokenizer.json "
                   "(or vocab.json + merges.txt)")
    s.add_argument("--out", required=True, help="run directory to write")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_import_hf)

    s = sub.add_parser("export-hf", help="run directory -> Hugging Face directory (from_pretrained)",
                       description=cmd_export_hf.__doc__)
    s.add_argument("run_dir")
    s.add_argument("--out", required=True, help="directory to write")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_export_hf)

    s = sub.add_parser("bench", help="lmforge vs Hugging Face transformers: training and decoding speed",
                       description=cmd_bench.__doc__)
    what = s.add_subparsers(dest="what", metavar="WHAT", required=True)
    for name, help_ in (("train", "training steps per second (forward, backward, AdamW) on random tokens"),
                        ("generate", "greedy decoding tokens per second, same weights in both")):
        b = what.add_parser(name, help=help_, description=help_)
        b.add_argument("--preset", help="model shape (default: 4 layers x 4 heads x 256, context 256, vocab 8192)")
        b.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override, e.g. model.n_layer=6 or train.loss_chunk=0 (repeatable)")
        b.add_argument("--device", default="auto", help="auto, cpu or cuda")
        b.add_argument("--batch-size", type=int, help="sequences per step (default: generate 1; train the preset's batch, else 8)")
        b.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (the median is reported)")
        b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile (default: on for CUDA, off for CPU); the reference is "
                       "compiled alike for training")
        b.add_argument("--no-reference", action="store_true", help="benchmark lmforge alone")
        b.add_argument("--json", action="store_true")
        b.set_defaults(func=cmd_bench, steps=None)
        if name == "train":
            b.add_argument("--steps", type=int, default=10, help="timed steps per round")
        else:
            b.add_argument("--prompt-tokens", type=int, default=32)
            b.add_argument("--new-tokens", type=int, help="default: 256, or what the context leaves after the prompt")
            b.add_argument("--reference-cache", default="static", choices=["static", "dynamic"],
                           help="KV cache of the HF reference (default static, its fastest)")
            b.add_argument("--reference-dtype", choices=["float32", "bfloat16"],
                           help="weights dtype of the reference (default: the same as lmforge's, "
                           "train.dtype; on CPU lmforge is fastest in bfloat16 and HF in float32)")
    b = what.add_parser("serve", help="lmforge serve under load: throughput and latency by concurrency",
                        description=cmd_bench_serve.__doc__)
    b.add_argument("run_dir", help="a GPT run directory to serve")
    b.add_argument("--concurrency", default="1,4,16", help="levels of requests in flight (default 1,4,16)")
    b.add_argument("--requests", type=int, default=16, help="requests per level (default 16)")
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--compile", action="store_true", help="serve with --compile")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("support", help="the customer-service assistant (FAQ answers, memory, human handoff)",
                       description=cmd_support.__doc__)
    act = s.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_ in (("init", "build or update an app directory from an FAQ (.csv, .jsonl or .md)"),
                        ("quickstart", "an app from the built-in FAQ about lmforge, evaluated on its test questions")):
        a = act.add_parser(name, help=help_, description=help_)
        if name == "init":
            a.add_argument("--faq", required=True, help="question/answer rows (.csv/.jsonl) or '## question' Markdown")
            a.add_argument("--out", required=True, help="the app directory (updated in place if it exists)")
            for col in ("question", "answer", "id", "category"):
                a.add_argument(f"--{col}-column", default=col)
        else:
            a.add_argument("--out", default="runs/support", help="the app directory (default runs/support)")
        a.add_argument("--encoder", help="an lmforge encoder run (default: all-MiniLM-L6-v2, imported into the app)")
        a.add_argument("--mask", help="personal data masked in stored messages: email,phone,card (default) or none")
        a.add_argument("--json", action="store_true")
        a.set_defaults(func=cmd_support)
    a = act.add_parser("eval", help="top-1, MRR@5 and the handoff threshold on labelled questions")
    a.add_argument("app_dir")
    a.add_argument("--questions", required=True, help='JSONL {"question": ..., "faq_id": ID | [IDS] | "none"}')
    a.add_argument("--no-save", action="store_true", help="do not save the fitted threshold to the app")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_support)
    a = act.add_parser("serve", help="customer chat (/), agent page (/agent), JSON API, /health, /metrics")
    a.add_argument("app_dir")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=8100)
    a.add_argument("--api-key", help="required on every customer endpoint but /health (default: $LMFORGE_API_KEY)")
    a.add_argument("--agent-key", help="the agent pages' key (default: $LMFORGE_AGENT_KEY, else a random one printed)")
    a.add_argument("--generate", metavar="RUN_DIR", help="a GPT run that rephrases the FAQ answers")
    a.add_argument("--max-concurrency", type=int, default=32)
    a.set_defaults(func=cmd_support)
    a = act.add_parser("export", help="conversations as JSON, with masking applied")
    a.add_argument("app_dir")
    a.add_argument("--conversation", help="a conversation id")
    a.add_argument("--customer", help="every conversation of this customer")
    a.add_argument("--out", help="write to this file (default: stdout)")
    a.set_defaults(func=cmd_support)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lmforge ... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
