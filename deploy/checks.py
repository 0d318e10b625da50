"""Checks of the deployment files, shared by tests/test_deploy.py and deploy/check.sh.

The functions need only PyYAML and the service package; the compose schema check also needs
jsonschema and check-jsonschema (for its copy of the Compose specification schema), which
deploy/check.sh installs. Command line (run from the repository root):

    python -m deploy.checks compose-schema FILE...          raw compose files vs the schema
    python -m deploy.checks compose-merged GPU.json CPU.json  `docker-compose config` output
    python -m deploy.checks dashboard-rules DASHBOARD OUT     dashboard queries as promtool rules
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from service.metrics import (
    ApiMetrics,
    QueueDepthCollector,
    RecordMetrics,
    VerdictMetrics,
    WorkerMetrics,
)

METRIC_NAME = re.compile(r"\bglad_[A-Za-z0-9_]+")
# Sample suffixes each metric type exposes (prometheus_client's family names drop _total).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that reads Compose's merge tags (!reset, !override) as their plain value."""


def _untagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", _untagged)
ComposeLoader.add_constructor("!override", _untagged)


def load_yaml(path: Path) -> Any:
    """One YAML document; Compose's merge tags are read as plain values."""
    with path.open() as file:
        return yaml.load(file, Loader=ComposeLoader)


def load_yaml_all(path: Path) -> list[Any]:
    """Every document of a multi-document YAML file (Kubernetes manifests)."""
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def exported_metric_names() -> set[str]:
    """Every sample name the API and the workers expose, read off service.metrics itself."""
    registry = CollectorRegistry()
    ApiMetrics(registry)
    RecordMetrics(registry)
    VerdictMetrics(registry)
    WorkerMetrics(registry)
    registry.register(QueueDepthCollector({}))
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """The glad_* metric names a PromQL expression reads."""
    return set(METRIC_NAME.findall(expr))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    return list(_panels(dashboard["panels"]))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL query of a Grafana dashboard: panel targets and query variables."""
    exprs = [
        target["expr"]
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def alert_exprs(rules: dict[str, Any]) -> list[str]:
    """Every expression of a Prometheus rules file."""
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def promql(expr: str) -> str | None:
    """A Grafana query as plain PromQL: its variables given fixed values.

    Variable queries such as label_values(...) are Grafana functions, not PromQL: None.
    """
    if expr.startswith("label_values("):
        return None
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def dashboard_rules(dashboard: dict[str, Any]) -> dict[str, Any]:
    """A rules file recording each dashboard query, for `promtool check rules`."""
    queries = [q for q in map(promql, dashboard_exprs(dashboard)) if q is not None]
    rules = [{"record": f"dashboard_query_{i}", "expr": q} for i, q in enumerate(queries)]
    return {"groups": [{"name": "dashboard-queries", "rules": rules}]}


def compose_schema_errors(paths: list[Path]) -> list[str]:
    """Where compose files break the Compose specification schema (empty when they pass)."""
    # Imported here: jsonschema and check-jsonschema are check.sh's tools, not test needs.
    import jsonschema
    from check_jsonschema.builtin_schemas import vendor

    schema = json.loads((resources.files(vendor) / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = []
    for path in paths:
        for error in validator.iter_errors(load_yaml(path)):
            where = "/".join(str(part) for part in error.absolute_path) or "(top)"
            errors.append(f"{path}: {where}: {error.message}")
    return errors


def _gpu_devices(config: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = config["services"]["worker"].get("deploy", {}).get("resources", {})
    return reservations.get("reservations", {}).get("devices", [])


def compose_merged_errors(gpu: dict[str, Any], cpu: dict[str, Any]) -> list[str]:
    """What is wrong with the resolved GPU and CPU stacks (`docker-compose config` JSON)."""
    errors = []
    devices = _gpu_devices(gpu)
    if not any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices):
        errors.append("GPU stack: the worker reserves no NVIDIA GPU")
    if gpu["services"]["worker"]["environment"].get("DEVICE") != "cuda":
        errors.append("GPU stack: the worker's DEVICE is not cuda")
    if _gpu_devices(cpu):
        errors.append(f"CPU stack: the worker still reserves devices: {_gpu_devices(cpu)}")
    if cpu["services"]["worker"]["environment"].get("DEVICE") != "cpu":
        errors.append("CPU stack: the worker's DEVICE is not cpu")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.checks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    schema = commands.add_parser("compose-schema", help="validate compose files")
    schema.add_argument("files", nargs="+", type=Path)
    merged = commands.add_parser("compose-merged", help="check resolved GPU and CPU stacks")
    merged.add_argument("gpu", type=Path)
    merged.add_argument("cpu", type=Path)
    rules = commands.add_parser("dashboard-rules", help="write dashboard queries as rules")
    rules.add_argument("dashboard", type=Path)
    rules.add_argument("out", type=Path)
    args = parser.parse_args(argv)

    if args.command == "dashboard-rules":
        dashboard = json.loads(args.dashboard.read_text())
        args.out.write_text(yaml.safe_dump(dashboard_rules(dashboard), sort_keys=False))
        return 0
    if args.command == "compose-schema":
        errors = compose_schema_errors(args.files)
    else:
        gpu, cpu = (json.loads(path.read_text()) for path in (args.gpu, args.cpu))
        errors = compose_merged_errors(gpu, cpu)
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
