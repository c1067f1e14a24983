"""`gpu-residency-gate check|wait`: the gate for shell scripts and Kubernetes init containers.

Exit status: 0 clear, 1 blocked (or timed out), 2 error (bad arguments or configuration).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from gate.core import ResidualGate
from gate.decision import Decision, GateTimeout
from gate.settings import (
    CLEAR_SAMPLES_ENV,
    DEFAULT_FAST_POLL_S,
    DEFAULT_MAX_AGE_S,
    EXPORTER_ENV,
    LEGACY_THRESHOLD_ENV,
    PROMETHEUS_ENV,
    SELECTOR_ENV,
    SOURCE_ENV,
    SOURCES,
    THRESHOLD_ENV,
    GateConfigError,
    default_node,
)

EPILOG = f"""\
GPUs are named by NVML index, UUID (GPU-...) or PCI bus id, comma-separated. An index is this
process's own (a pod given the node's GPUs 4-7 calls them 0-3): for the exporter and Prometheus it
is resolved to the card's UUID through $NVIDIA_VISIBLE_DEVICES, local NVML or `nvidia-smi -L`;
where none of them answers, name GPUs by UUID. --clear-samples N holds the GPUs clear for N looks
--poll seconds apart; a wait that cannot finish that streak before --timeout exits 1.
The threshold comes from --threshold-gb, else ${THRESHOLD_ENV}, else ${LEGACY_THRESHOLD_ENV}, else 2.
The source is --source, else ${SOURCE_ENV}, else auto: the exporter when its URL is given
(--exporter-url or ${EXPORTER_ENV}), else prometheus when a URL is given (--prometheus-url or
${PROMETHEUS_ENV}), else local NVML, else nvidia-smi. A Prometheus holding several clusters
(a central store, a Thanos or Mimir Querier) is read through --prometheus-selector (or
${SELECTOR_ENV}): label matchers such as cluster="a" added to every query.
Exporter credentials: --exporter-user (or $GPU_RESIDENCY_EXPORTER_USER) with the password in
$GPU_RESIDENCY_EXPORTER_PASSWORD or a file (--exporter-password-file,
$GPU_RESIDENCY_EXPORTER_PASSWORD_FILE); https is verified against --exporter-ca-file
($GPU_RESIDENCY_EXPORTER_CA_FILE), else the system's CAs.

examples:
  gpu-residency-gate check --gpus 0,1
  gpu-residency-gate wait --gpus 0,1 --exporter-url http://$NODE_IP:9852 --timeout 120
  gpu-residency-gate wait --gpus GPU-5d1c...,3 --threshold-gb 2 --timeout 120 \\
      --source prometheus --prometheus-url http://prometheus:9090 --node $NODE_NAME
  gpu-residency-gate check --gpus 0 --source prometheus --prometheus-url http://thanos-query:9090 \\
      --prometheus-selector 'cluster="a"'

exit status: 0 clear, 1 blocked or timed out, 2 bad arguments or configuration
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-residency-gate",
        description="Block a wake-up onto shared GPUs until whole-GPU used memory is under a threshold.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="check|wait")
    for name, help_text in (("check", "look once"), ("wait", "poll until clear or timeout")):
        sub = commands.add_parser(
            name, help=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        gpus_help = "comma-separated indices, UUIDs or PCI bus ids; a MIG device: MIG-... or gpu:gi"
        sub.add_argument("--gpus", required=True, help=gpus_help)
        sub.add_argument(
            "--node", default=default_node(), help="node label to read in Prometheus (default $NODE_NAME or host name)"
        )
        sub.add_argument("--threshold-gb", type=float, help="GiB; a GPU is clear strictly under it")
        sub.add_argument("--source", choices=SOURCES, help="where to read (default auto)")
        sub.add_argument("--prometheus-url", help=f"Prometheus base URL (default ${PROMETHEUS_ENV})")
        sub.add_argument(
            "--prometheus-selector",
            metavar="MATCHERS",
            help=f"label matchers added to every Prometheus query, e.g. 'cluster=\"a\"' (default ${SELECTOR_ENV})",
        )
        sub.add_argument(
            "--exporter-url", help=f"the node's exporter, e.g. http://10.0.0.7:9852 (default ${EXPORTER_ENV})"
        )
        sub.add_argument("--exporter-ca-file", metavar="FILE", help="CA bundle that signed the exporter's certificate")
        sub.add_argument("--exporter-user", metavar="USER", help="basic auth user for the exporter")
        sub.add_argument(
            "--exporter-password-file", metavar="FILE", help="file holding that user's password (never a flag)"
        )
        sub.add_argument(
            "--max-age", type=float, help=f"seconds before a Prometheus sample is stale (default {DEFAULT_MAX_AGE_S:g})"
        )
        sub.add_argument("--fail-open", action="store_true", help="clear when the source fails (default: block)")
        sub.add_argument("--json", action="store_true", help="print the decision as JSON")
        sub.add_argument(
            "--wake",
            metavar="ENGINE",
            help="the engine this wake-up is for: the decision is recorded for the exporter "
            "(in $GPU_RESIDENCY_REGISTRY/gate) so waking it anyway is alerted on",
        )
        sub.add_argument(
            "--waiting-for", metavar="ENGINE", help="the engine whose release is awaited, named in the explanation"
        )
        if name == "wait":
            sub.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
            sub.add_argument(
                "--poll", type=float, default=0.5, help="longest seconds between looks, far from clearing (default 0.5)"
            )
            sub.add_argument(
                "--fast-poll",
                type=float,
                help=f"seconds between looks close to clearing, and early on (default {DEFAULT_FAST_POLL_S})",
            )
            sub.add_argument(
                "--clear-samples", type=int, help=f"consecutive clear looks needed (default ${CLEAR_SAMPLES_ENV} or 1)"
            )
    return parser


def _as_json(decision: Decision) -> str:
    return json.dumps(
        {
            "ok": decision.ok,
            "source": decision.source,
            "threshold_bytes": decision.threshold_bytes,
            "fail_open": decision.fail_open,
            "reasons": list(decision.reasons),
            "gpus": [
                {
                    "gpu": v.requested,
                    "clear": v.clear,
                    "reason": v.reason,
                    "used_bytes": v.sample.used_bytes if v.sample else None,
                    "uuid": v.sample.uuid if v.sample else None,
                    "holders": [str(h) for h in v.sample.holders] if v.sample else [],
                }
                for v in decision.gpus
            ],
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {"fail_open": True} if args.fail_open else {}
    for key, value in (
        ("threshold_gb", args.threshold_gb),
        ("source", args.source),
        ("prometheus_url", args.prometheus_url),
        ("prometheus_selector", args.prometheus_selector),
        ("max_age_s", args.max_age),
        ("exporter_url", args.exporter_url),
        ("poll_s", getattr(args, "poll", None)),
        ("fast_poll_s", getattr(args, "fast_poll", None)),
        ("clear_samples", getattr(args, "clear_samples", None)),
    ):
        if value is not None:
            overrides[key] = value
    exporter_options = {
        key: value
        for key, value in (
            ("ca_file", args.exporter_ca_file),
            ("username", args.exporter_user),
            ("password_file", args.exporter_password_file),
        )
        if value is not None
    }
    if exporter_options:
        overrides["exporter_options"] = exporter_options
    gpus = [item.strip() for item in args.gpus.split(",") if item.strip()]
    try:
        gate = ResidualGate.from_env(**overrides)
        if args.command == "check":
            decision = gate.check(gpus, args.node, wake=args.wake, waiting_for=args.waiting_for)
        else:
            progress = _Progress() if sys.stderr.isatty() and not args.json else None
            try:
                decision = gate.wait(
                    gpus,
                    args.node,
                    timeout=args.timeout,
                    on_poll=progress,
                    wake=args.wake,
                    waiting_for=args.waiting_for,
                )
            except GateTimeout as exc:
                decision = exc.decision
                if progress:
                    sys.stderr.write("\n")
                held = f" ({exc.held})" if exc.held else ""
                print(f"timed out after {exc.waited:.1f}s{held}", file=sys.stderr)
                print(_as_json(decision) if args.json else decision.explain())
                return 1  # not clear for long enough, whatever the last look said
            else:
                if progress:
                    sys.stderr.write("\n")
    except GateConfigError as exc:
        print(f"gpu-residency-gate: {exc}", file=sys.stderr)
        return 2
    print(_as_json(decision) if args.json else decision.explain())
    return 0 if decision.ok else 1


class _Progress:
    """One status line on the terminal, redrawn at most ten times a second (looks can be far more)."""

    def __init__(self) -> None:
        self._shown = 0.0

    def __call__(self, decision: Decision, elapsed: float) -> None:
        now = time.monotonic()
        if now - self._shown < 0.1:
            return
        self._shown = now
        shown_bytes = [v.sample.used_bytes for v in decision.gpus if v.sample and v.sample.used_bytes is not None]
        worst = max(shown_bytes, default=None)
        shown = "no data" if worst is None else f"max {worst / 1024**3:.2f} GiB"
        state = "clear" if decision.ok else "blocked"
        threshold = decision.threshold_bytes / 1024**3
        sys.stderr.write(f"\r{elapsed:6.1f}s  {state}: {shown} (threshold {threshold:.2f} GiB)  ")
        sys.stderr.flush()


if __name__ == "__main__":
    raise SystemExit(main())
