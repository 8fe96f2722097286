"""What MLflow's system metrics (CPU, memory, disk, network: ``mlflow.system_metrics``, a
sampling thread per run that needs psutil) cost a trial's training: trainer tokens/s with
the monitor running on the trial's live run against the same training without it, side by
side in this process, interleaved A B B A per pair of rounds so that drift in machine load
hits both; the ratio of the medians is printed (1.0: costs nothing).

Both sides train the same model on the same batches into a live run (``LiveRunTracker``,
sqlite store in a temp dir), as a sweep trial does; only the monitor differs. ``--interval``
is the monitor's sampling interval (MLflow's default 10 s; 1 s samples ten times as often).

    python bench/system_metrics.py [--config configs/demo.yaml] [--steps 60] [--rounds 6] [--interval 10]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import real_tokens  # noqa: E402

from slmfactory.data.tokens.streams import PackedBatches  # noqa: E402
from slmfactory.models.arch.lm import build_model, count_params  # noqa: E402
from slmfactory.models.train.trainer import Trainer  # noqa: E402
from slmfactory.platform.config import load_config  # noqa: E402
from slmfactory.platform.tracking import (  # noqa: E402
    LiveRunTracker, client_for, ensure_experiment, find_or_create_run)


def one_round(cfg, batches, vocab: int, steps: int, uri: str, name: str, interval: float | None) -> tuple[float, int]:
    """(tokens/s, system-metric points logged) of one fit into a fresh live run, with the
    system metrics monitor sampling every ``interval`` s (None: no monitor)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    client = client_for(uri)
    run = find_or_create_run(client, ensure_experiment(client, uri, "bench"), "bench.round", name, name)
    live = LiveRunTracker(uri, run.info.run_id)
    seq_len = cfg.data.seq_len
    tcfg = cfg.replace(**{"pretrain.max_tokens": steps * cfg.pretrain.batch_size * seq_len,
                          "pretrain.eval_every": 0, "pretrain.checkpoint_every": 0}).pretrain
    torch.manual_seed(0)
    trainer = Trainer(build_model(cfg.slm, vocab, seq_len), batches, tcfg, seq_len=seq_len, out_dir=None, log=None,
                      tracker=live, log_every=10)
    monitor = None
    if interval is not None:
        monitor = SystemMetricsMonitor(run.info.run_id, sampling_interval=interval, tracking_uri=uri)
        monitor.start()
    t0 = time.perf_counter()
    res = trainer.fit(resume=False)
    rate = res.tokens / (time.perf_counter() - t0)
    if monitor is not None:
        monitor.finish()
    live.close()
    points = sum(len(client.get_metric_history(run.info.run_id, k))
                 for k in client.get_run(run.info.run_id).data.metrics if k.startswith("system/"))
    return rate, points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=6, help="rounds per side (even: A B B A pairs)")
    ap.add_argument("--interval", type=float, default=10.0, help="the monitor's sampling interval, seconds")
    args = ap.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    cfg = load_config(args.config)
    seq_len, bs = cfg.data.seq_len, cfg.pretrain.batch_size
    tokens, vocab = real_tokens(cfg.tokenizer.vocab_size, (args.steps + 1) * bs * seq_len * 2)
    batches = PackedBatches(tokens, seq_len, bs, seed=0)
    print(f"model {cfg.slm.preset}: {count_params(build_model(cfg.slm, vocab, seq_len)) / 1e6:.2f}M params, "
          f"batch {bs} x {seq_len}, {args.steps} steps/round, {torch.get_num_threads()} threads, "
          f"monitor every {args.interval:g} s")
    with tempfile.TemporaryDirectory(prefix="slmf-sysmetrics-") as d:
        uri = f"sqlite:///{Path(d) / 'mlflow.db'}"
        one_round(cfg, batches, vocab, 3, uri, "warm-up", None)
        rates: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            line = []
            for monitored in order:
                rate, points = one_round(cfg, batches, vocab, args.steps, uri, f"r{r}-{monitored}",
                                         args.interval if monitored else None)
                rates[monitored].append(rate)
                line.append(f"{'with' if monitored else 'without'} {rate:,.0f} tok/s"
                            + (f" ({points} system points)" if monitored else ""))
            print(f"round {r}: " + "   ".join(line))
    ratio = statistics.median(rates[True]) / statistics.median(rates[False])
    spread = max(rates[False]) / min(rates[False])
    print(f"with/without system metrics tokens/s ratio: {ratio:.3f} "
          f"(run-to-run spread without: {spread:.3f}x max/min)")


if __name__ == "__main__":
    main()
