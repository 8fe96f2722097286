"""``slmfactory`` command line. New settings go into the config tree, not new flags:
every subcommand takes ``--config RECIPE`` and ``--set KEY=VALUE`` overrides.

Each subcommand imports what it runs inside its own function, on purpose: ``slmfactory
--help`` or ``config show`` must not pay for torch, Ray, MLflow and transformers (seconds),
and a subcommand loads only its own layer. Everywhere else slmfactory imports sit at the
top of the file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from slmfactory.platform import runtime  # noqa: F401  (sets Ray/MLflow env defaults first)
from slmfactory.platform.errors import SlmFactoryError
from slmfactory.platform.runtime import say

SUBCOMMANDS = ("corpus", "tokenizer", "cluster", "resample", "train", "sweep", "report", "recommend", "ui", "serve",
               "demo", "try", "specialize", "config", "calibrate")


def _config(args, resolve: bool = True):
    """The recipe and overrides of ``args``; ``resolve``: read the strategy settings now, so
    a bad one fails here (``slmfactory serve`` runs no strategy and leaves them unread)."""
    from slmfactory.platform.config import load_config, parse_overrides

    cfg = load_config(args.config, parse_overrides(args.set or []))
    return cfg.resolve() if resolve else cfg


def cmd_corpus(args) -> None:
    from slmfactory.data.corpus import build_corpus, import_corpus

    cfg = _config(args)
    if args.action == "build":
        manifest = build_corpus(cfg)
    elif args.action == "sample":
        from slmfactory.data.corpus import SAMPLE_DIR, build_sample_corpus

        # The real-text sample ships in the package: its files are also what the
        # `corpus import` examples can point at.
        print(f"sample files: {SAMPLE_DIR}")
        manifest = build_sample_corpus(cfg)
    else:
        domains: dict[str, list[str]] = {}
        for item in args.domain or []:
            if "=" not in item:
                raise SlmFactoryError(f"--domain {item!r}: expected NAME=PATH (a file or glob)")
            name, path = item.split("=", 1)
            domains.setdefault(name, []).append(path)
        if not args.generic:
            raise SlmFactoryError("corpus import: --generic PATH is required (a file or glob)")
        manifest = import_corpus(cfg, args.generic, domains)
    print_manifest(manifest, cfg.corpus_dir)


def print_manifest(manifest: dict, corpus_dir: Path) -> None:
    print(f"corpus written to {corpus_dir}")
    print(f"{'part':<36} {'docs':>8} {'MB':>8} {'tokens(ws)':>12}")
    for name, part in sorted(manifest["parts"].items()):
        print(f"{name:<36} {part['docs']:>8,} {part['bytes'] / 1e6:>8.2f} {part.get('tokens_ws', 0):>12,}")
    # Which share of each domain's sources the generic corpus holds (absent in old manifests).
    moved = manifest.get("domain_to_generic")
    if moved:
        print(f"\n{'domain -> generic':<20} {'share docs':>10} {'MB':>7} {'overflow docs':>13} {'MB':>7} "
              f"{'dropped docs':>12} {'MB':>7}")
        for name, m in sorted(moved.items()):
            print(f"{name:<20} {m['share_docs']:>10,} {m['share_bytes'] / 1e6:>7.2f} "
                  f"{m['overflow_docs']:>13,} {m['overflow_bytes'] / 1e6:>7.2f} "
                  f"{m['dropped_docs']:>12,} {m['dropped_bytes'] / 1e6:>7.2f}")


def cmd_tokenizer(args) -> None:
    from slmfactory.data.tokens import ensure_tokenizer, load_tokenizer

    cfg = _config(args)
    path = ensure_tokenizer(cfg)
    print(f"tokenizer ({len(load_tokenizer(path))} tokens) at {path}")


def cmd_cluster(args) -> None:
    from slmfactory.data.clustering import run_clustering
    from slmfactory.data.tokens import ensure_tokenizer
    from slmfactory.platform.tracking import open_tracker
    from slmfactory.trial import TrialRecord

    cfg = _config(args)
    ensure_tokenizer(cfg)
    with runtime.ray_session(args.address):
        tracker = open_tracker(cfg, f"cluster-k{cfg.cluster.k}", {TrialRecord.PHASE: "cluster"})
        clusters = run_clustering(cfg, tracker=tracker)
        tracker.close()
    print(clusters.summary())


def cmd_resample(args) -> None:
    from slmfactory.data.clustering import resample
    from slmfactory.platform.tracking import open_tracker
    from slmfactory.trial import TrialRecord

    cfg = _config(args)
    with runtime.ray_session(args.address):
        tracker = open_tracker(cfg, f"resample-{args.domain}",
                               {TrialRecord.PHASE: "resample", TrialRecord.DOMAIN: args.domain})
        result = resample(cfg, args.domain, args.tokens, tracker=tracker)
        tracker.close()
    print(result.summary())


def cmd_train(args) -> None:
    from slmfactory.pipeline import run_strategy

    cfg = _config(args)
    overrides = {}
    if args.strategy:
        overrides["strategy.name"] = args.strategy
    if args.domain:
        overrides["data.domain"] = args.domain
    cfg = cfg.replace(**overrides) if overrides else cfg
    run_strategy(cfg, address=args.address)


def cmd_sweep(args) -> None:
    from slmfactory.sweeps.plan import ClusterShape
    from slmfactory.sweeps.run import run_sweep

    described = (args.nodes, args.gpus_per_node, args.cpus_per_node)
    cluster = None
    if any(v is not None for v in described):
        if not args.dry_run:
            raise SlmFactoryError("sweep: --nodes/--gpus-per-node/--cpus-per-node describe a cluster to plan for "
                                  "and go with --dry-run (a sweep runs on the cluster it joins)")
        nodes = 1 if args.nodes is None else args.nodes
        gpus, cpus = args.gpus_per_node or 0, args.cpus_per_node
        if nodes < 1 or gpus < 0 or cpus is None or cpus <= 0:
            raise SlmFactoryError(f"sweep: a described cluster needs --nodes >= 1, --gpus-per-node >= 0 and "
                                  f"--cpus-per-node > 0 (got {nodes}, {gpus}, {cpus})")
        cluster = ClusterShape.described(nodes, gpus, cpus)
    outcome = run_sweep(_config(args), resume=args.resume, dry_run=args.dry_run, address=args.address,
                        recipe=args.config or "RECIPE", cluster=cluster)
    if outcome is not None:
        print(f"sweep done in {outcome.seconds:.0f}s: {len(outcome.records)} trials logged to MLflow experiment "
              f"{outcome.experiment!r}; next: slmfactory report -c {args.config or 'RECIPE'}")


def cmd_calibrate(args) -> None:
    import json

    steps = _positive_int("--steps", args.steps)
    cfg = _config(args)
    out = Path(args.out).expanduser() if args.out else cfg.root / "device-profile.json"
    if out.is_dir():
        raise SlmFactoryError(f"--out {args.out}: a folder; expected the path of the JSON file to write")
    from slmfactory.models.train import calibrate, write_profile
    from slmfactory.platform.machine import describe, this_machine

    recipe = args.config or "RECIPE"
    here = this_machine()
    print(f"calibrate {recipe}: {describe(here)}, torch {here['torch']}, {here['threads']} threads"
          + (f", device cuda ({here['gpu']})" if here["gpu"] else ""), flush=True)
    measured = calibrate(cfg, steps, log=lambda line: print(line, flush=True))
    path = write_profile(measured, out)
    name = cfg.device.name
    print(f"\n| model | params | compute params | path (auto) | measured tokens/s | {name} projects | "
          f"measured / profile |\n|---|---|---|---|---|---|---|")
    for m in measured:
        print(f"| {m.model} | {m.params / 1e6:.2f}M | {m.compute_params / 1e6:.2f}M | {m.plan} | "
              f"{m.tokens_per_s:,.0f} | {m.projected_tokens_per_s:,.0f} | {m.ratio:.2f}x |")
    print(f"\ndevice-profile rows -> {path}:")
    for m in measured:
        print(json.dumps(m.row))
    print(f"\nprice with them alone: --set device.throughput_file={path} --set 'device.throughput=[]' "
          f"(e.g. slmfactory sweep -c {recipe} ... --dry-run), or the same two keys in the recipe's device section")


def _positive_int(flag: str, text: str) -> int:
    """A flag's value as a positive integer, or one line naming the flag."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise SlmFactoryError(f"{flag} {text!r}: expected a positive integer") from None
    if value < 1:
        raise SlmFactoryError(f"{flag} {text}: expected a positive integer")
    return value


def _experiment(cfg, name: str | None) -> str:
    from slmfactory.trial import experiment_name

    return name or experiment_name(cfg)


def cmd_report(args) -> None:
    from slmfactory.analysis.report import write_report

    cfg = _config(args)
    experiment = _experiment(cfg, args.experiment)
    out = Path(args.out) if args.out else cfg.root / "reports" / experiment
    report = write_report(cfg.tracking_uri, experiment, out, cfg.sweep.inference_caps,
                          price_per_device_hour=cfg.serving.price_per_device_hour)
    from slmfactory.sweeps.records import log_report_to_sweep

    parent = log_report_to_sweep(cfg.tracking_uri, experiment, out, report)
    print(report["table"])
    print("Recommendation:")
    print(report["recommendation"])
    print(f"report: {out / 'report.md'} ({len(report['files']) - 1} plots), logged to MLflow experiment {experiment!r}"
          + (f" (sweep run {parent}: report/, recommendation.md, configurations.json)" if parent else ""))


def cmd_recommend(args) -> None:
    from slmfactory.analysis.measured import COST_UNITS, UNIT_LABEL
    from slmfactory.analysis.recommend import recommend_from_mlflow, serving_unit_label
    from slmfactory.platform.cost import COST_CONVENTIONS, check_convention, check_task

    def _positive(flag: str, text: str, integer: bool = False) -> float:
        """A flag's value as a positive number, or one line naming the flag (argparse's own
        type errors print the usage too)."""
        import math

        try:
            value = float(text)
        except ValueError:
            raise SlmFactoryError(f"{flag} {text!r}: expected a number") from None
        if not math.isfinite(value) or value <= 0 or (integer and value != int(value)):
            raise SlmFactoryError(f"{flag} {text}: expected a {'positive integer' if integer else 'number > 0'}")
        return int(value) if integer else value

    inference = _positive("--inference-params", args.inference_params)
    budget = _positive("--spec-budget", args.spec_budget)
    n = _positive("--domains", args.domains, integer=True)
    in_domain = _positive("--in-domain", args.in_domain, integer=True) if args.in_domain is not None else None
    if args.cost not in COST_UNITS:
        raise SlmFactoryError(f"--cost {args.cost!r}: expected one of {', '.join(COST_UNITS)}")
    conv = check_convention(args.costs, "--costs")
    other = next(c for c in COST_CONVENTIONS if c != conv)
    serving_limit = _positive("--inference-cost", args.inference_cost) if args.inference_cost is not None else None
    task = check_task(args.inference_task, "--inference-task")
    cfg = _config(args)
    experiment = _experiment(cfg, args.experiment)
    unit = UNIT_LABEL[args.cost]
    price = cfg.serving.price_per_device_hour
    serving_unit = serving_unit_label(price)
    rec = recommend_from_mlflow(cfg.tracking_uri, experiment, inference, budget, n, in_domain, args.cost, conv,
                                serving_limit, task, price)
    best, runner = rec.best, rec.runner_up

    def ppl(c) -> str:
        iv = c.interval
        return f"{c.ppl_macro:.2f}" + (f" [95% {iv[0]:.2f}, {iv[1]:.2f}]" if iv else " (no interval logged)")

    print(f"recommended: {best.strategy} (generic budget {best.generic_budget}, specialisation {best.spec_budget}"
          + (f", {best.settings}" if best.settings else "") + f", {best.params / 1e6:.2f}M parameters served)")
    print(f"  from in-domain size {rec.in_domain:,} tokens, {n} domains, cost in {unit} ({conv} costs)")
    print(f"  expected macro perplexity {ppl(best)} over {len(best.nll)} measured domains")
    print(f"  total cost for {n} domains ({conv} costs): C(N) = {best.generic(args.cost, conv):.3e} + {n} x "
          f"{best.spec(args.cost, conv):.3e} = {best.total(n, args.cost, conv):.3e} {unit}")
    print(f"  per-domain cost C_spec + C_generic / N: {best.per_domain(n, args.cost, conv):.3e} {unit} ({conv} costs)"
          + (f"; {best.per_domain(n, args.cost, other):.3e} ({other} costs)" if best.has_cost(args.cost, other)
             else ""))
    if best.serving:
        print(f"  serving cost ({serving_unit}): " + ", ".join(
            f"{best.serving_cost(t, price):.3e} per million {'generated' if t == 'generate' else 'scored'} tokens"
            for t in ("generate", "score") if best.has_serving_cost(t))
            + (f" (<= {serving_limit:.3g} asked)" if serving_limit is not None else "")
            + f"; measured on {best.serving_machine or 'an unrecorded machine'}")
    else:
        print("  serving cost: not measured (models exported with serving.cost_measure_s 0, or before it existed)")
    if runner is None:
        print("  runner-up: none (one strategy fits)")
    else:
        print(f"  runner-up: {runner.strategy} ({runner.label}), macro perplexity {ppl(runner)}, "
              f"C(N) = {runner.total(n, args.cost, conv):.3e} {unit} ({conv} costs)")
        print("  tie: the intervals overlap; these measurements do not separate the two" if rec.tie
              else "  not a tie: the intervals do not overlap")
    # What `serve --from-registry` would serve for this configuration, per domain.
    from slmfactory.sweeps.records import trial_model_uri
    from slmfactory.trial import TrialRecord as R

    for d in sorted(best.nll):
        tags = {R.STRATEGY: best.strategy, R.GENERIC_BUDGET: best.budget_tags[0], R.SPEC_BUDGET: best.budget_tags[1],
                R.IN_DOMAIN_TOKENS: str(best.in_domain), R.DOMAIN: d, R.SETTINGS: best.settings}
        found = trial_model_uri(cfg.tracking_uri, experiment, tags)
        if found:
            uri, aliases = found
            name = uri.split("/")[1]
            print(f"  model {d}: {uri}" + "".join(f" = models:/{name}@{a}" for a in sorted(aliases)))


def cmd_ui(args) -> None:
    import shutil as sh
    import subprocess

    cfg = _config(args)
    exe = sh.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    cmd = [exe, "ui", "--backend-store-uri", cfg.tracking_uri, "--host", args.host, "--port", str(args.port)]
    page = ""
    try:  # the sweep's runs in MLflow's model-training view (3.17 opens on GenAI traces otherwise)
        from slmfactory.platform.tracking import client_for
        from slmfactory.trial import experiment_name

        exp = client_for(cfg.tracking_uri).get_experiment_by_name(experiment_name(cfg))
        if exp is not None:
            page = f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    except Exception:  # noqa: BLE001 (the store may not exist yet; the UI still starts)
        pass
    print(f"MLflow UI: open http://{args.host}:{args.port}/{page} ({cfg.tracking_uri}); Ctrl-C stops it", flush=True)
    raise SystemExit(subprocess.call(cmd))


def cmd_serve(args, after_start: Callable[[str, int], bool] | None = None) -> None:
    """``slmfactory serve``; ``after_start(host, port)`` runs once the app answers (``try``
    sends its first completion there) and ends the server when it returns True."""
    from slmfactory.serving.app import build_app
    from slmfactory.serving.auth import is_loopback, load_keys
    from slmfactory.serving.foreground import serve_in_foreground

    cfg = _config(args, resolve=False)  # serving runs no strategy: their settings stay unread
    host = args.host or cfg.serving.host
    port = args.port or cfg.serving.port
    api_keys, admin_keys = load_keys(cfg)
    if not (api_keys or admin_keys) and not is_loopback(host) and not args.insecure:
        raise SlmFactoryError(f"serve: --host {host} is reachable from other machines and no API key is set "
                              "(serving.api_keys_file or $SLMFACTORY_API_KEYS); set keys, or pass --insecure")
    if args.from_registry:
        # Each domain's models:/NAME@ALIAS, which the replicas resolve, download and follow
        # as the alias moves (build_app's from_registry).
        from slmfactory.serving.catalog import registry_sources

        if args.models or args.from_mlflow:
            raise SlmFactoryError("serve: give one of --models, --from-mlflow, --from-registry")
        for d, e in sorted(registry_sources(cfg.tracking_uri, _experiment(cfg, None), args.from_registry).items()):
            print(f"domain {d}: {e.uri}, {e.strategy}, {e.params / 1e6:.2f}M parameters, test ppl {e.test_ppl:.2f}")
    app = build_app({"config": args.config, "set": args.set or [], "models": args.models,
                     "from_mlflow": args.from_mlflow, "max_params": args.max_params,
                     **({"from_registry": args.from_registry, "experiment": _experiment(cfg, None)}
                        if args.from_registry else {})})
    serve_in_foreground(app, host, port, args.address, cfg.serving.access_log, after_start)


def cmd_config(args) -> None:
    import json

    from slmfactory.platform.recipe_schema import recipe_schema, show_yaml

    if args.action == "show":
        sys.stdout.write(show_yaml(_config(args)))
    else:
        if args.config or args.set:
            raise SlmFactoryError("config schema: takes no --config/--set (the schema is the same for every recipe)")
        print(json.dumps(recipe_schema(), indent=2))


def cmd_demo(args) -> None:
    from slmfactory.demo import run_demo

    run_demo(_config(args))


TRY_PROMPT = "The court held that the"
"""``slmfactory try``'s first completion: a legal opening, for the recipe's legal model."""


def cmd_try(args) -> None:
    """``make try``: a served model answering a completion within minutes of ``make setup``.
    The real-text sample shipped in the package (no download), its tokenizer, one ``slm``
    trial (pretraining on the sample's generic text, fine-tuning on the domain), then the
    OpenAI-compatible server with that model; it sends one completion itself and prints
    it, with the curl line to send more. ``make demo`` is the whole story."""
    import json
    import time
    import urllib.request

    from slmfactory.data.corpus import build_sample_corpus, list_domains, manifest_path
    from slmfactory.pipeline import run_strategy

    t0 = time.perf_counter()
    cfg = _config(args)
    if not manifest_path(cfg.corpus_dir).is_file():
        build_sample_corpus(cfg)
        print(f"[try] corpus: the real-text sample shipped in the package ({len(list_domains(cfg.corpus_dir))} domains "
              f"and generic text) -> {cfg.corpus_dir}", flush=True)
    record = run_strategy(cfg, address=args.address)
    print(f"[try] trained {cfg.strategy.name} on {cfg.data.domain} in {time.perf_counter() - t0:.0f}s: test perplexity "
          f"{record.ppl:.1f}; model at {record.model_path}", flush=True)

    def first_completion(host: str, port: int) -> bool:
        body = {"model": cfg.data.domain, "prompt": TRY_PROMPT, "max_tokens": 24, "temperature": 0}
        request = urllib.request.Request(f"http://{host}:{port}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.loads(reply.read())
        print(f"[try] POST /v1/completions {{model: {cfg.data.domain!r}, prompt: {TRY_PROMPT!r}, max_tokens: 24, "
              f"temperature: 0}} answered in {time.perf_counter() - t0:.0f}s since `make try` began:\n"
              f"  {(TRY_PROMPT + answer['choices'][0]['text']).replace(chr(10), chr(10) + '  ')}\n"
              f"[try] the model knows only a {cfg.data.domain_train_tokens:,}-token sample: `make demo` trains the "
              f"real ones. Send your own:\n  curl -s http://{host}:{port}/v1/completions -H 'Content-Type: "
              f"application/json' -d '{{\"model\": \"{cfg.data.domain}\", \"prompt\": \"The defendant\", "
              f"\"max_tokens\": 32}}'", flush=True)
        return args.once

    args.models = str(cfg.root / "models")
    args.from_mlflow = args.from_registry = None
    args.max_params = None
    args.insecure = False
    cmd_serve(args, after_start=first_completion)


def cmd_specialize(args) -> None:
    from slmfactory.data.corpus import expand_patterns, read_user_file
    from slmfactory.models.instant import generic_families
    from slmfactory.serving.domains import DomainStore, check_name, create_domain, finetune_and_swap, register_in_mlflow

    cfg = _config(args)
    check_name(args.name)
    if args.finetune_budget is not None and args.finetune_budget < 1:
        raise SlmFactoryError(f"--finetune-budget: expected a positive number of tokens, got {args.finetune_budget}")
    if DomainStore(cfg.root).exists(args.name):
        raise SlmFactoryError(f"--name: domain {args.name!r} already exists in {cfg.root}")
    docs = Path(args.docs)
    files = sorted(f for f in docs.rglob("*") if f.is_file() and f.suffix.lower() in (".txt", ".jsonl", ".parquet")) \
        if docs.is_dir() else expand_patterns([args.docs])
    texts = [d["text"] for f in files for d in read_user_file(f) if d["text"].strip()]
    if not texts:
        raise SlmFactoryError(f"--docs {args.docs}: no documents (.txt: one per file; .jsonl/.parquet: a 'text' field)")
    with runtime.ray_session(args.address):
        families = generic_families(cfg, train=True, log=say)
        entry, built = create_domain(cfg, args.name, texts, families, log=say)
        print(f"{'rule':<20}{'held-out ppl':>13}{'seconds':>9}{'FLOPs':>11}")
        for rule, c in built.candidates.items():
            print(f"{rule:<20}{c.heldout_ppl:>13.2f}{c.seconds:>9.2f}{c.flops:>11.2e}" + ("  <- served" if rule == built.chosen else ""))
        print(f"embedding + histogram: {built.shared_seconds:.2f}s, {built.shared_flops:.2e} FLOPs")
        if cfg.tracking.enabled:
            info = register_in_mlflow(cfg, args.name, entry, {"heldout_ppl": entry["test_ppl"], "params": entry["params"]})
            DomainStore(cfg.root).update(args.name, mlflow=info)
            print(f"registered in MLflow as {info['registered_model']} (run {info['run_id']})")
        print(f"domain {args.name!r}: {entry['strategy']} from {len(texts)} documents at {entry['path']}; "
              f"a `slmfactory serve` on this workdir answers it as model {args.name!r}")
        if args.finetune_budget:
            done = finetune_and_swap(cfg.to_tree(), args.name, int(args.finetune_budget))
            ft = done["finetune"]
            print(f"fine-tuned within {args.finetune_budget} tokens ({ft.get('steps')} steps): held-out ppl "
                  f"{ft.get('before_ppl', float('nan')):.2f} -> {ft.get('heldout_ppl', float('nan')):.2f}; "
                  f"{'now served' if ft['status'] == 'done' else 'the instant model stays served (no better)'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slmfactory",
        description="Train and serve specialised small language models from limited domain data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", "-c", default=None, help="YAML recipe (configs/*.yaml); defaults otherwise")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key, e.g. --set pretrain.lr=3e-4 (repeatable)")
        p.set_defaults(func=func)
        return p

    p = add("corpus", cmd_corpus, "build the real offline corpus, import your own, or build the tiny sample "
            "corpus shipped in the package")
    p.add_argument("action", choices=("build", "import", "sample"))
    p.add_argument("--generic", action="append", metavar="PATH", help="import: generic text file or glob")
    p.add_argument("--domain", action="append", metavar="NAME=PATH", help="import: a domain's file or glob")
    add("tokenizer", cmd_tokenizer, "train the BPE tokenizer on the generic corpus")
    for name, func, help_ in (("cluster", cmd_cluster, "embed, k-means and assign windows (Ray Data)"),
                              ("resample", cmd_resample, "importance-resample generic data to a domain"),
                              ("train", cmd_train, "pretrain and specialise one strategy on one domain")):
        p = add(name, func, help_)
        p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
        if name == "resample":
            p.add_argument("--domain", required=True)
            p.add_argument("--tokens", type=int, required=True, help="generic tokens to draw")
        if name == "train":
            p.add_argument("--strategy", default=None, help="overrides strategy.name")
            p.add_argument("--domain", default=None, help="overrides data.domain")
    p = add("sweep", cmd_sweep, "run the recipe's sweep: grid on Ray Tune, one MLflow run per trial")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--resume", action="store_true", help="continue a killed sweep; finished trials are kept")
    p.add_argument("--dry-run", action="store_true", help="print the plan and projected costs; run nothing")
    p.add_argument("--nodes", type=int, default=None, help="--dry-run on a described cluster: this many nodes")
    p.add_argument("--gpus-per-node", type=float, default=None, help="... each with this many GPUs")
    p.add_argument("--cpus-per-node", type=float, default=None, help="... and this many CPUs")
    p = add("report", cmd_report, "tables and plots of a sweep from MLflow (perplexity vs cost, Figure 1)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the recipe's sweep)")
    p.add_argument("--out", default=None, help="output folder (default: <workdir>/reports/<experiment>)")
    p = add("recommend", cmd_recommend, "the best measured strategy for an inference size, budget and N domains")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the recipe's sweep)")
    # Parsed in cmd_recommend, so that a bad value is one line naming its flag.
    p.add_argument("--inference-params", required=True, help="largest served model, in parameters")
    p.add_argument("--spec-budget", required=True,
                   help="budget per domain in --cost units: specialisation + generic / N")
    p.add_argument("--domains", required=True, help="number of domains N")
    p.add_argument("--in-domain", default=None, metavar="TOKENS", help="your in-domain tokens: answers from the "
                   "largest measured size <= this (default: the largest measured)")
    p.add_argument("--cost", default="flops", help="cost unit of --spec-budget: flops or device_hours")
    p.add_argument("--costs", default="paper", metavar="CONVENTION",
                   help="cost convention: paper (embedding the generic corpus is nobody's cost, as in the paper; "
                        "default) or measured (everything spent); docs/costs.md")
    p.add_argument("--inference-cost", default=None, metavar="COST",
                   help="largest serving cost per million tokens, measured on each model at export: in device-hours,"
                        " or priced when serving.price_per_device_hour is set (docs/costs.md#serving-cost)")
    p.add_argument("--inference-task", default="generate", metavar="TASK",
                   help="what --inference-cost prices: generate (default) or score")
    p = add("ui", cmd_ui, "open the MLflow UI on the run's tracking store (127.0.0.1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p = add("serve", cmd_serve, "serve each domain's specialised model (Ray Serve, OpenAI-compatible)")
    p.add_argument("--models", default=None, help="a folder of exported models (default: the sweep's MLflow records)")
    p.add_argument("--from-mlflow", default=None, metavar="EXPERIMENT", help="serve the best model of each domain "
                   "a sweep logged (default experiment: the recipe's sweep)")
    p.add_argument("--from-registry", nargs="?", const="champion", default=None, metavar="ALIAS",
                   help="serve models:/<experiment>-<domain>@ALIAS of every domain, following the alias as it "
                        "moves (default alias: champion; champion-<cap> per sweep.inference_caps)")
    p.add_argument("--max-params", type=float, default=None, help="inference-size cap: largest served model")
    p.add_argument("--host", default=None, help="bind address (default serving.host: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default serving.port)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--insecure", action="store_true", help="serve a non-loopback --host with no API key "
                   "(anyone reaching the port may query and create domains)")
    add("demo", cmd_demo, "the whole platform: corpus → tokenizer → clusters → sweep → report → recommendation")
    p = add("try", cmd_try, "a served model in minutes: the package's text sample, one slm trial, the "
            "OpenAI-compatible server and a first completion (`make try`; use -c configs/try.yaml)")
    p.add_argument("--once", action="store_true", help="stop the server after the first completion")
    p.add_argument("--host", default=None, help="bind address (default serving.host: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default serving.port)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p = add("specialize", cmd_specialize, "a new domain's model from a handful of its documents, without training "
            "(served at once by `serve`); optionally fine-tuned within a budget")
    p.add_argument("--docs", required=True, help="a folder (.txt = one document; .jsonl/.parquet with 'text'), "
                   "a file or a glob")
    p.add_argument("--name", required=True, help="the new domain's model name")
    p.add_argument("--finetune-budget", type=int, default=None, metavar="TOKENS",
                   help="then fine-tune on the documents within this many tokens (Ray Train) and swap it in")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p = add("config", cmd_config, "print the fully resolved recipe as YAML (show), or the recipes' JSON Schema "
            "(schema, for editors)")
    p.add_argument("action", choices=("show", "schema"))
    p = add("calibrate", cmd_calibrate, "measure this machine's training tokens/s at the recipe's model shapes: "
            "device-profile rows (device.throughput_file) and their ratio to the recipe's profile")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="the rows' JSON file (default: <workdir>/device-profile.json)")
    p.add_argument("--steps", default="12", metavar="N", help="timed training steps per model (default 12)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except SlmFactoryError as e:
        print(f"slmfactory: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slmfactory: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (FileNotFoundError, PermissionError, IsADirectoryError, UnicodeDecodeError) as e:
        # OS-level input problems are user errors too: one line, no traceback.
        print(f"slmfactory: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        # A bug, not bad input: still one line by default; the traceback on request.
        if os.environ.get("SLMFACTORY_DEBUG") == "1":
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"slmfactory: internal error: {type(e).__name__}: {first} "
              f"(rerun with SLMFACTORY_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
