"""Does the cloud run what the host runs? The layer's package versions against the host's.

`deploy` records in the deployment config which versions the layer holds
(`layer_packages`) and which host versions had no wheel for Lambda's platform
(`layer_fallbacks`). `status` prints the whole report; `deploy` prints what differs; the
executor calls `differences(config)` once at start and warns about the packages its tasks
use. The host side is read when asked (the host may have changed since the deploy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .layer import LayerSource, canonical_name, host_version

# Config keys this module writes and reads.
PACKAGES, FALLBACKS, UNZIPPED, PYC = ("layer_packages", "layer_fallbacks",
                                      "layer_unzipped_bytes", "layer_pyc")


@dataclass(frozen=True)
class Row:
    """One package of the report."""

    package: str
    host: str | None     # None: not installed on this host
    layer: str | None    # None: not in the layer

    @property
    def same(self) -> bool:
        return self.host == self.layer


def layer_packages(config: dict[str, Any]) -> dict[str, str] | None:
    """{package: version} the deployed layer holds; {} without a layer; None when the
    config does not know (a deploy by an older lambdafutures, or a layer reused from a
    deploy whose config is gone)."""
    if config.get("layer_arn") is None:
        return {}
    packages = config.get(PACKAGES)
    return None if packages is None else dict(packages)


def report(config: dict[str, Any]) -> list[Row]:
    """Every package of the layer, with the host's version of it."""
    packages = layer_packages(config) or {}
    return [Row(name, host_version(name), version) for name, version in sorted(packages.items())]


def differences(deployment_config: dict[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    """{package: (host version, layer version)} for the layer's packages whose versions
    differ (host None: not installed here). Empty when all match or nothing is known."""
    return {row.package: (row.host, row.layer) for row in report(deployment_config)
            if not row.same}


def difference_for(deployment_config: dict[str, Any],
                   name: str) -> tuple[str | None, str | None] | None:
    """(host, layer) when `name` (a module's top-level package or a project name) differs;
    None when it matches or is not in the layer."""
    return differences(deployment_config).get(canonical_name(name))


def record(source: LayerSource | None, config: dict[str, Any],
           previous: dict[str, Any] | None) -> dict[str, Any]:
    """The config keys describing the layer `deploy` just ensured: from this run's build,
    else from the previous config when it names the same layer version."""
    if source is None:
        return {PACKAGES: {}, FALLBACKS: {}, UNZIPPED: 0, PYC: False}
    if source.built:
        return {PACKAGES: source.built["packages"], FALLBACKS: source.built["fallbacks"],
                UNZIPPED: source.built["unzipped_bytes"], PYC: source.built["pyc"]}
    if previous and previous.get("layer_arn") == config.get("layer_arn"):
        return {key: previous.get(key) for key in (PACKAGES, FALLBACKS, UNZIPPED, PYC)}
    return {PACKAGES: None, FALLBACKS: None, UNZIPPED: None, PYC: None}


def describe(config: dict[str, Any], only_differences: bool = False) -> list[str]:
    """The report as lines for the command line."""
    packages = layer_packages(config)
    if packages is None:
        return ["environment: the layer's package versions are not recorded (deployed by "
                "another host or an older lambdafutures); `lambdafutures deploy "
                "--requirements FILE` rebuilds and records them"]
    if not packages:
        return ["environment: no layer packages (tasks import only what the function zip "
                "and the runtime hold)"]
    rows = report(config)
    different = [row for row in rows if not row.same]
    if only_differences and not different:
        return [f"environment: the layer's {len(rows)} package(s) match this host"]
    shown = different if only_differences else rows
    width = max(len(row.package) for row in shown)
    lines = [f"environment: {len(different)} of {len(rows)} layer package(s) differ from "
             "this host" + (":" if shown else "")]
    fallbacks = config.get(FALLBACKS) or {}
    for row in shown:
        note = "same" if row.same else "DIFFERENT"
        if row.package in fallbacks and not row.same:
            note += f" (no {fallbacks[row.package]} wheel for the runtime's platform)"
        lines.append(f"  {row.package:<{width}}  host {row.host or '-':<12} "
                     f"layer {row.layer or '-':<12} {note}")
    return lines
