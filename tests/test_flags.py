"""The exporter's flags as users know them: every option, its default, its type and its help text
are those of the parser before each package declared its own flags (issue 25); only the order of
--help may differ. Recorded from that parser; a deliberate change updates this file."""

import argparse
import hashlib
import json

import pytest

from exporter.cli import build_parser

FLAGS = [
    (("--api.max-wait",), 60.0),
    (("--api.max-waiters",), 16),
    (("--api.wait-interval",), 0.01),
    (("--collection.min-interval",), 0.25),
    (("--collector.cycles", "--no-collector.cycles"), True),
    (("--collector.exits", "--no-collector.exits"), True),
    (("--collector.gate", "--no-collector.gate"), True),
    (("--collector.gpu", "--no-collector.gpu"), True),
    (("--collector.processes", "--no-collector.processes"), True),
    (("--collector.sglang", "--no-collector.sglang"), True),
    (("--collector.sleep_wake", "--no-collector.sleep_wake"), True),
    (("--collector.vllm", "--no-collector.vllm"), True),
    (("--demo",), False),
    (("--engines.allowed-hosts", "--sglang.allowed-hosts"), ""),
    (("--engines.config-file",), None),
    (("--engines.discover", "--no-engines.discover"), True),
    (("--engines.discovery-interval",), 10.0),
    (("--engines.release-floor-gb",), 2.0),
    (("--engines.release-timeout",), 60.0),
    (("--engines.residual-window",), 10),
    (("--engines.state-interval",), 0.25),
    (("--engines.state-mismatch-grace",), 15.0),
    (("--engines.wake-timeout",), 300.0),
    (("--exits.first-zero-seconds",), 60.0),
    (("--exits.grace-period",), 30.0),
    (("--exits.retention",), 3600.0),
    (("--forensics.cgroup-root",), "/sys/fs/cgroup"),
    (("--forensics.child-window",), 10.0),
    (("--forensics.interval",), 1.0),
    (("--forensics.kmsg",), "/dev/kmsg"),
    (("--forensics.tree-interval",), 30.0),
    (("--forensics.window",), 60.0),
    (("--log.level",), "info"),
    (("--node",), "n"),
    (("--nvml.library",), None),
    (("--nvml.timeout",), 5.0),
    (("--registry.dir",), "/run/gpu-residency/engines"),
    (("--sglang.poll-interval",), 15.0),
    (("--sglang.timeout",), 3.0),
    (("--state.dir",), "/var/lib/gpu-residency"),
    (("--version",), "==SUPPRESS=="),
    (("--vllm.poll-interval",), 2.0),
    (("--vllm.timeout",), 3.0),
    (("--web.config.file",), None),
    (("--web.listen-address",), ":9852"),
    (("--web.max-connections",), 128),
    (("--web.telemetry-path",), "/metrics"),
    (("-h", "--help"), "==SUPPRESS=="),
]
NON_NEGATIVE = {"--collection.min-interval", "--exits.first-zero-seconds", "--forensics.interval"}
INTEGER = {"--web.max-connections", "--api.max-waiters"}
CYCLES = {"--engines.residual-window"}  # a whole number of cycles, 5 to 100 (issue 35)
# sha256 over every flag's (options, help, metavar, choices, dest), sorted, as JSON.
HELP_DIGEST = "a8fddcc2b185277053f9c1545fd06b5ff51740f0c551df737f2565dd6285c026"


@pytest.fixture
def parser(monkeypatch) -> argparse.ArgumentParser:
    """Built where the environment-derived defaults are known."""
    monkeypatch.setenv("NODE_NAME", "n")
    monkeypatch.delenv("GPU_RESIDENCY_REGISTRY", raising=False)
    return build_parser()


def test_every_flag_and_default_is_as_before(parser):
    assert sorted((tuple(a.option_strings), a.default) for a in parser._actions) == FLAGS


def test_every_flag_takes_the_numbers_it_took(parser):
    for action in parser._actions:
        flag, kind = action.option_strings[0], getattr(action.type, "__name__", None)
        if flag in INTEGER:
            assert kind == "int", flag
        elif flag in CYCLES:
            assert kind == "cycle_count" and action.type("5") == 5, flag
            for bad in ("4", "101", "2.5"):
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(bad)
        elif flag in NON_NEGATIVE:
            assert kind == "non_negative_float" and action.type("0") == 0, flag
        elif kind is not None:
            assert kind == "positive_float", flag
            with pytest.raises(argparse.ArgumentTypeError):
                action.type("0")


def test_every_help_text_is_as_before(parser):
    helps = sorted(
        (" ".join(a.option_strings), a.help or "", str(a.metavar), str(a.choices), a.dest) for a in parser._actions
    )
    assert hashlib.sha256(json.dumps(helps).encode()).hexdigest() == HELP_DIGEST, helps
