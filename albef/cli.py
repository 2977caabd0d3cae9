"""The ``albef`` command line. Heavy libraries are imported inside each command to keep start-up fast."""

from __future__ import annotations

import argparse
import json
import logging
import pkgutil
import sys
from pathlib import Path

# the config and the task registry are torch-free: the CLI starts without importing torch
from albef.config import PRESETS, ConfigError, load_model_config, read_params
from albef.tasks import EVAL_TASKS, FINETUNE_TASKS, MODEL_TASKS, REGISTER_TASKS, TASKS


def _convert_official(args: argparse.Namespace) -> int:
    from albef.checkpoint import (
        build_model,
        infer_config,
        load_official,
        read_official_state_dict,
        save_pretrained,
    )

    state = read_official_state_dict(args.src)
    base = load_model_config(args.params) if args.params else PRESETS[args.preset]()
    cfg = infer_config(state, base, image_size=args.image_size)
    model = build_model(args.task, cfg)
    report = load_official(model, state, strict=args.strict)
    out = save_pretrained(model, args.dst, task=args.task)
    print(
        f"converted {args.src} -> {out} (task {args.task}, image size {cfg.vision.image_size}, "
        f"queue {cfg.queue_size})"
    )
    print(report.summary())
    return 0


def _parity(args: argparse.Namespace) -> int:
    from albef.parity import check_reference

    files = sorted(Path(args.directory).glob("albef_ref_*.pt"))
    if not files:
        print(f"no albef_ref_*.pt files in {args.directory}", file=sys.stderr)
        return 2
    failed = 0
    for path in files:
        report = check_reference(path, tolerance=args.tolerance)
        worst = max((e.max_abs_error for e in report.entries), default=float("nan"))
        status = "ok" if report.ok else "FAIL"
        print(f"{status:4} {path.name}: {len(report.entries)} entries, worst |diff| {worst:.3g}")
        for line in report.failures():
            print(f"     {line}")
        failed += not report.ok
    return 1 if failed else 0


def _report(args: argparse.Namespace) -> int:
    from albef.report import report_stage, table

    print(table(report_stage(args.project, args.out or None)))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from albef.profiles import apply_profile, as_set_args, load_profile

    profile = load_profile(args.name)
    merged = apply_profile(read_params(args.params), profile)  # validated even when only printing
    if args.write:
        import yaml

        Path(args.write).write_text(yaml.safe_dump(merged, sort_keys=False))
        print(f"wrote {args.write}: {args.params} with the {args.name!r} profile ({len(profile)} keys)")
    else:
        print(as_set_args(profile))
    return 0


def _info(args: argparse.Namespace) -> int:
    from albef.checkpoint import build_model, parameter_count

    cfg = load_model_config(args.params) if args.params else PRESETS[args.preset]()
    model = build_model(args.task, cfg)
    print(cfg.to_json())
    return _print_json(
        {
            "parameters": parameter_count(model),
            "trainable_parameters": parameter_count(model, trainable_only=True),
        }
    )


def _synth(args: argparse.Namespace) -> int:
    from albef.data.stages import synth_stage

    card = synth_stage(read_params(args.params), progress=not args.quiet)
    return _print_json({k: v for k, v in card.items() if not isinstance(v, (dict, list))})


def _preprocess(args: argparse.Namespace) -> int:
    from albef.data.stages import preprocess_stage

    return _print_json(preprocess_stage(read_params(args.params), progress=not args.quiet))


def _s3_transfer(args: argparse.Namespace) -> int:
    from albef.data.s3 import S3Settings, pull, push

    settings = S3Settings(endpoint_url=args.endpoint_url)
    if args.s3_command == "pull":
        report = pull(args.uri, args.dest, settings, progress=not args.quiet)
    else:
        report = push(args.src, args.uri, settings, progress=not args.quiet)
    print(report.summary())
    return 0


def _print_json(result, sort_keys: bool = False) -> int:
    print(json.dumps(result, indent=2, sort_keys=sort_keys))
    return 0


def _unimodal(args: argparse.Namespace) -> int:
    from albef.stages import tracked_unimodal

    metrics = tracked_unimodal(read_params(args.params), progress=not args.quiet)
    return _print_json(metrics, sort_keys=True)


def _finetune(args: argparse.Namespace) -> int:
    from albef.stages import tracked_train

    # (also `albef pretrain`, as the task "pretrain"; the NLVR2 text-assignment pretraining is a "finetuning"
    # of the pretrained model on image pairs)
    name = TASKS[args.task].train_section
    metrics = tracked_train(read_params(args.params), name, args.task, progress=not args.quiet)
    return _print_json(metrics, sort_keys=True)


def _evaluate(args: argparse.Namespace) -> int:
    from albef.stages import tracked_evaluate, with_test_file

    as_read = read_params(args.params)
    params = with_test_file(as_read, args.task, args.test_file) if args.test_file else as_read
    metrics = tracked_evaluate(
        params,
        args.model,
        args.out,
        args.metrics,
        progress=not args.quiet,
        task=args.task,
        pipeline_params=as_read,  # --test-file adjusts a copy; the pipeline run is named by the file
    )
    return _print_json(metrics, sort_keys=True)


# albef predict <task>: its help, its model's name, its image options, its text option
_PREDICT_COMMANDS = {
    "vqa": ("the top answers to a question about an image", "VQA", ("image",), "question"),
    "ve": (
        "SNLI-VE: entailment, neutral or contradiction of a hypothesis about an image",
        "SNLI-VE",
        ("image",),
        "hypothesis",
    ),
    "nlvr": ("NLVR2: is a sentence true of a pair of images", "NLVR2", ("left", "right"), "text"),
}


def _predict(args: argparse.Namespace) -> int:
    from albef.serving.predict import predict

    _, _, image_options, text_option = _PREDICT_COMMANDS[args.task]
    settings = {"answer_list": args.answer_list, "k": args.k, "top": args.top} if args.task == "vqa" else {}
    result = predict(
        args.task,
        args.model,
        {f"--{option}": getattr(args, option) for option in image_options},
        (text_option, getattr(args, text_option)),
        device=args.device,
        **settings,
    )
    if args.task == "vqa":
        result = [{"answer": a, "probability": round(p, 5)} for a, p in result]
    else:
        result["probability"] = round(result["probability"], 5)
        result["probabilities"] = {k: round(v, 5) for k, v in result["probabilities"].items()}
    return _print_json(result)


def _explain(args: argparse.Namespace) -> int:
    from albef.eval.grounding import explain

    info = explain(
        args.image,
        args.text,
        args.model,
        args.out,
        layer=args.layer,
        tokenizer=args.tokenizer,
        device=args.device,
    )
    return _print_json(info)


def _register(args: argparse.Namespace) -> int:
    from albef.tracking.register import register_stage

    return _print_json(register_stage(read_params(args.params), args.out, task=args.task), sort_keys=True)


def _registry(args: argparse.Namespace) -> int:
    from albef.tracking.config import register_config, tracking_config
    from albef.tracking.registry import Registry

    params = read_params(args.params)
    cfg = register_config(params, args.task)
    if args.name:
        cfg.model_name = args.name
    registry = Registry(cfg, tracking_config(params).resolved_uri())
    if args.registry_command == "list":
        rows = registry.list()
        if not rows:
            print(f"{cfg.model_name}: no versions")
        for row in rows:
            aliases = ",".join(row["aliases"]) or "-"
            print(
                f"v{row['version']:<4} {aliases:<22} {cfg.gate.metric}={row[cfg.gate.metric]}  "
                f"{row['decision'] or '-'}: {row['reason'] or ''}"
            )
    elif args.registry_command == "promote":
        decision = registry.promote(args.version, force=args.force)
        print(f"{'promoted' if decision.promote else 'not promoted'}: {decision.reason}")
        return 0 if decision.promote else 1
    elif args.registry_command == "fetch":
        from albef.tracking.integrity import fetch_verified

        if args.version:
            version = registry.version(args.version).version
        else:
            holder = registry.holder(args.alias or cfg.champion_alias)
            if holder is None:
                print(
                    f"{cfg.model_name}: no version holds {args.alias or cfg.champion_alias!r}",
                    file=sys.stderr,
                )
                return 1
            version = holder.version
        folder = fetch_verified(registry.client, cfg.model_name, version, args.dst)
        print(
            f"{cfg.model_name} v{version}: every file matches its registration; in {folder}\n"
            f"serve it with: MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false mlflow models serve -m {folder} "
            "--env-manager local"
        )
    else:
        target = registry.rollback(args.to)
        print(f"{cfg.model_name}: {cfg.champion_alias} is now v{target}")
    return 0


def _mlflow_sync(args: argparse.Namespace) -> int:
    from albef.tracking.config import tracking_config, validate_tracking_uri
    from albef.tracking.journal import sync_spool

    cfg = tracking_config(read_params(args.params))
    uri = (
        validate_tracking_uri(args.tracking_uri, "--tracking-uri")
        if args.tracking_uri
        else cfg.resolved_uri()
    )
    report = sync_spool(args.spool_dir or cfg.spool_dir, uri)
    print(report.summary())
    return 1 if report.pending else 0


def _device_option(parser: argparse.ArgumentParser) -> None:
    # the stages read `device` from their params.yaml section; the commands without one take it here
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (this machine's GPU if it has one, else cpu) | cpu | cuda | cuda:N (default: auto)",
    )


def _stage_command(subparsers, name: str, helptext: str, func) -> argparse.ArgumentParser:
    """A command that runs a stage with the settings of a params.yaml, with a progress bar unless --quiet."""
    parser = subparsers.add_parser(name, help=helptext)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="albef", description="ALBEF vision-language pretraining")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert-official", help="convert an official ALBEF checkpoint to albef's format")
    conv.add_argument("src", help="official checkpoint (.pth): ALBEF.pth, mscoco.pth, a training snapshot")
    conv.add_argument("dst", help="output directory (model.safetensors + config.json)")
    conv.add_argument("--task", choices=MODEL_TASKS, required=True)
    conv.add_argument(
        "--preset",
        choices=["base", "small", "tiny"],
        default="base",
        help="supplies what weights cannot tell (heads, special token ids); default base",
    )
    conv.add_argument("--params", help="take the model section of this params.yaml instead of a preset")
    conv.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="target image size (position embeddings are resampled), e.g. 384 for finetuning",
    )
    conv.add_argument("--strict", action="store_true", help="fail if any model weight is missing")
    conv.set_defaults(func=_convert_official)

    par = sub.add_parser("parity", help="check albef against official reference files")
    par.add_argument("directory", help="folder of albef_ref_<model>.pt files")
    par.add_argument("--tolerance", type=float, default=1e-5)
    par.set_defaults(func=_parity)

    data = sub.add_parser("data", help="the synthetic benchmark and S3 transfers")
    data_sub = data.add_subparsers(dest="s3_command", required=True)
    _stage_command(data_sub, "synth", "generate the synthetic benchmark (params.yaml: synth)", _synth)
    for name, helptext, positionals in (
        ("pull", "download s3://bucket/prefix into DEST", ("uri", "dest")),
        ("push", "upload SRC to s3://...", ("src", "uri")),
    ):
        transfer = data_sub.add_parser(name, help=helptext)
        for positional in positionals:
            transfer.add_argument(positional, help="s3://bucket/prefix" if positional == "uri" else None)
        transfer.add_argument(
            "--endpoint-url",
            default=None,
            help="any S3-compatible endpoint (default: ALBEF_S3_ENDPOINT_URL or AWS_ENDPOINT_URL)",
        )
        transfer.add_argument("--quiet", action="store_true")
        transfer.set_defaults(func=_s3_transfer)

    _stage_command(
        sub,
        "preprocess",
        "validate and shard a dataset, build its tokenizer (params: preprocess)",
        _preprocess,
    )
    _stage_command(
        sub,
        "unimodal",
        "warm-start the image and text encoders on the synthetic benchmark (params: unimodal, model)",
        _unimodal,
    )
    _stage_command(
        sub, "pretrain", "pretrain ALBEF (params: pretrain, model); works under torchrun and SLURM", _finetune
    ).set_defaults(task="pretrain")
    fine = _stage_command(sub, "finetune", "finetune a pretrained model (params: finetune_<task>)", _finetune)
    fine.add_argument("task", choices=FINETUNE_TASKS)

    evaluate = _stage_command(
        sub,
        "evaluate",
        "evaluate a model (params: evaluate for retrieval, evaluate_<task> otherwise)",
        _evaluate,
    )
    evaluate.add_argument("task", choices=EVAL_TASKS)
    evaluate.add_argument("--model", required=True, help="an albef model folder (pretrained or finetuned)")
    evaluate.add_argument(
        "--out", required=True, help="folder for the report: metrics.json, rankings/results, example images"
    )
    evaluate.add_argument(
        "--test-file",
        help="an annotation file of the section's data_dir instead of its test_file(s), e.g. a shifted test set",
    )
    evaluate.add_argument("--metrics", help="also write the metrics JSON here (for DVC)")

    predict = sub.add_parser("predict", help="answer with a finetuned model")
    predict_sub = predict.add_subparsers(dest="task", required=True)
    for task, (helptext, model_name, image_options, text_option) in _PREDICT_COMMANDS.items():
        cmd = predict_sub.add_parser(task, help=helptext)
        cmd.add_argument(
            "--model", required=True, help=f"an albef {model_name} model folder (finetune_{task} export)"
        )
        for option in image_options:
            cmd.add_argument(
                f"--{option}", required=True, help=None if option == "image" else f"the {option} image"
            )
        cmd.add_argument(f"--{text_option}", required=True)
        if task == "vqa":
            cmd.add_argument(
                "--answer-list", help="JSON list of answers; default: the one exported with the model"
            )
            cmd.add_argument("--k", type=int, default=128, help="candidates re-ranked (official k_test 128)")
            cmd.add_argument("--top", type=int, default=5)
        _device_option(cmd)
        cmd.set_defaults(func=_predict)

    expl = sub.add_parser(
        "explain", help="Grad-CAM heat map of every word of a text on an image (ITM score), as a PNG grid"
    )
    expl.add_argument("--image", required=True)
    expl.add_argument("--text", required=True)
    expl.add_argument(
        "--model", required=True, help="an albef model folder with an ITM head (pretrain, retrieval)"
    )
    expl.add_argument("--out", required=True, help="the PNG to write")
    expl.add_argument("--layer", type=int, help="text-encoder fusion layer (default: the official third one)")
    expl.add_argument("--tokenizer", help="default: the tokenizer saved with the model")
    _device_option(expl)
    expl.set_defaults(func=_explain)

    reg = sub.add_parser(
        "register",
        help="register an evaluated model in MLflow and run the promotion gate (params: register, "
        "register_<task>)",
    )
    reg.add_argument(
        "--task",
        choices=REGISTER_TASKS,
        default="retrieval",
        help="which model: retrieval (params: register, the default), vqa, ve or nlvr (register_<task>)",
    )
    reg.add_argument("--params", default="params.yaml")
    reg.add_argument("--out", help="also write the outcome as JSON here (for DVC)")
    reg.set_defaults(func=_register)

    registry = sub.add_parser("registry", help="the MLflow model registry: list, promote, rollback, fetch")
    registry_sub = registry.add_subparsers(dest="registry_command", required=True)
    for name, helptext in (
        ("list", "versions with their aliases, gate metric and promotion decision"),
        ("promote", "run the gate for a version against the champion (--force: skip the gate)"),
        ("rollback", "give the champion alias back to the previous champion (or --to N)"),
        ("fetch", "download a version (default: the champion) and check every file against its registration"),
    ):
        cmd = registry_sub.add_parser(name, help=helptext)
        cmd.add_argument("--params", default="params.yaml")
        cmd.add_argument(
            "--task",
            choices=REGISTER_TASKS,
            default="retrieval",
            help="the task whose registration settings apply (model name, gate, aliases); default retrieval",
        )
        cmd.add_argument(
            "--name", help="registered model name (default: model_name of register / register_<task>)"
        )
        if name == "promote":
            cmd.add_argument("--version", required=True)
            cmd.add_argument("--force", action="store_true", help="promote without the gate")
        if name == "rollback":
            cmd.add_argument("--to", help="version to make champion (default: the previous champion)")
        if name == "fetch":
            which = cmd.add_mutually_exclusive_group()
            which.add_argument("--version", help="the version to fetch")
            which.add_argument(
                "--alias", help="the alias whose version to fetch (default: the champion alias)"
            )
            cmd.add_argument("--dst", required=True, help="folder to download the checked model into")
        cmd.set_defaults(func=_registry)

    mlf = sub.add_parser("mlflow", help="MLflow tracking utilities")
    mlf_sub = mlf.add_subparsers(dest="mlflow_command", required=True)
    sync = mlf_sub.add_parser("sync", help="deliver tracking calls kept while the server was unreachable")
    sync.add_argument("--params", default="params.yaml")
    sync.add_argument("--spool-dir", help="default: mlflow.spool_dir")
    sync.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else mlflow.tracking_uri")
    sync.set_defaults(func=_mlflow_sync)

    rep = sub.add_parser(
        "report",
        help="one row per task: headline metric, chance or trivial baseline, registry champion (from metrics/)",
    )
    rep.add_argument("--project", default=".", help="the folder holding metrics/ (default: here)")
    rep.add_argument("--out", default="metrics/summary.json", help="also write the rows here ('' : don't)")
    rep.set_defaults(func=_report)

    prof = sub.add_parser(
        "profile",
        help="a named set of params overrides (gpu, smoke) or a YAML file of them: printed as dvc exp run -S "
        "arguments, or --write a whole params file",
    )
    prof.add_argument("name", help="gpu | smoke | a YAML file of section.key: value lines")
    prof.add_argument("--params", default="params.yaml", help="the params file the profile applies to")
    prof.add_argument("--write", metavar="PATH", help="write params with the profile applied to PATH")
    prof.set_defaults(func=_profile)

    info = sub.add_parser("info", help="print a model configuration and its parameter counts")
    info.add_argument("--task", choices=MODEL_TASKS, default="pretrain")
    info.add_argument("--preset", choices=["base", "small", "tiny"], default="small")
    info.add_argument("--params", help="take the model section of this params.yaml")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from albef.orchestration.launch import relaunch_if_requested

    relaunch_if_requested(argv)  # ALBEF_NPROC_PER_NODE > 1 (set by the Prefect flows): re-run under torchrun
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    # (torch-free: synth, preprocess and report start without the models)
    from albef.safe_load import CheckpointError

    expected: list[type[BaseException]] = [ConfigError, CheckpointError, FileNotFoundError, ValueError]
    for commands, error in (  # the failures of one command, imported only for it
        (("data", "preprocess"), "albef.data.preprocess:PreprocessError"),
        (("pull", "push"), "albef.data.s3:S3Error"),  # boto3: only the S3 transfers need it
        (("unimodal", "pretrain", "finetune", "evaluate"), "albef.train.engine:TrainingDiverged"),
        (("unimodal", "pretrain", "finetune", "evaluate"), "albef.train.engine:CheckpointWriteError"),
        (("register", "registry", "mlflow"), "albef.tracking.registry:RegistryError"),
    ):
        if args.command in commands or getattr(args, "s3_command", None) in commands:
            expected.append(pkgutil.resolve_name(error))
    try:
        return args.func(args)
    except tuple(expected) as exc:
        from albef.tracking.redact import redact_text  # a URI's password never reaches the terminal

        print(f"albef {args.command}: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
