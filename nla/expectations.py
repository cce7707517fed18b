"""Running a Great Expectations suite on a pandas frame and turning its result into a gate.

`run_suite` validates a frame against a list of GX expectations in an ephemeral context
(progress bars off) and returns one plain summary per expectation, with a few offending rows
named by `row_id`. `finish_gate` writes the JSON report (always, pass or fail) and raises
`QualityGateError` with one line naming the failed expectations. The gates themselves, what
they expect of each table, live in `nla.quality`. great_expectations is imported inside
`run_suite` only: it is heavy, and absent on machines that only train.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from nla.errors import NLAError
from nla.io import write_json
from nla.provenance import beside, write_provenance

N_OFFENDING = 5  # offending rows kept per expectation in the report
N_MESSAGE = 3  # ... and shown in the error message
INDEX = "row_id"  # offending rows are named by this column


class QualityGateError(NLAError):
    """A data-quality gate failed: the message names the expectations and offending rows."""


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and nested containers as plain JSON-able Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)  # NaN/inf are not valid JSON
    return value


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    return str(value)


def run_suite(
    gate: str,
    frame: pd.DataFrame,
    expectations: list,
    *,
    extra_offending: dict[str, list[dict]] | None = None,
) -> list[dict[str, Any]]:
    """Validate `frame` against GX `expectations` (each with meta["name"]); one summary dict per expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas(gate).add_dataframe_asset(gate).add_batch_definition_whole_dataframe(gate)
    )
    suite = context.suites.add(gx.ExpectationSuite(name=gate, expectations=expectations))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    result_format = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": N_OFFENDING,
        "unexpected_index_column_names": [INDEX],
    }
    validation = batch.validate(suite, result_format=result_format)

    by_name = {r.expectation_config.meta["name"]: r for r in validation.results}
    summaries = []
    for expectation in expectations:  # suite order, not GX's (it reorders results)
        name = expectation.meta["name"]
        r = by_name[name]
        config, result = r.expectation_config, dict(r.result)
        kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
        offending = [
            {INDEX: row.get(INDEX), **{k: v for k, v in row.items() if k != INDEX}}
            for row in result.get("partial_unexpected_index_list") or []
        ]
        if not offending and not r.success:
            offending = (extra_offending or {}).get(name, [])
        summary = {
            "name": name,
            "expectation": config.type,
            "description": config.description,
            "kwargs": kwargs,
            "success": bool(r.success),
            "observed": {
                k: result[k]
                for k in (
                    "element_count",
                    "unexpected_count",
                    "unexpected_percent",
                    "missing_count",
                    "observed_value",
                    "partial_missing_list",
                )
                if k in result
            },
            "offending": offending,
        }
        if r.exception_info.get("raised_exception"):
            summary["success"] = False
            summary["observed"]["exception"] = str(r.exception_info.get("exception_message")).splitlines()[0]
        summaries.append(_plain(summary))
    return summaries


def expect(cls, name: str, description: str, **kwargs):
    """A GX expectation tagged with our short name (reports and messages use it)."""
    return cls(meta={"name": name}, description=description, **kwargs)


def _columns_of(config: Any) -> str:
    kwargs = {k: v for k, v in config.items() if k.startswith("column")}
    return ",".join(str(v) for v in kwargs.values())


def _describe_failure(s: dict[str, Any]) -> str:
    columns = _columns_of(s["kwargs"])
    head = f"{s['name']} {s['expectation']}" + (f"({columns})" if columns else "")
    obs = s["observed"]
    if "exception" in obs:
        return f"{head} raised {obs['exception']}"
    parts = []
    if "unexpected_count" in obs:
        parts.append(f"{obs['unexpected_count']} of {obs['element_count']} rows")
    elif "observed_value" in obs and obs["observed_value"] is not None:
        parts.append(f"observed {_short(obs['observed_value'])}")
    if obs.get("partial_missing_list"):
        parts.append(f"missing {obs['partial_missing_list']}")
    rows = []
    for row in s["offending"][:N_MESSAGE]:
        values = ", ".join(f"{k}={_short(v)}" for k, v in row.items() if k != INDEX)
        rows.append(f"{row.get(INDEX)} ({values})" if values else str(row.get(INDEX)))
    if rows:
        parts.append("e.g. " + "; ".join(rows))
    return f"{head}: " + ", ".join(parts) if parts else head


def finish_gate(
    gate: str,
    summaries: list[dict[str, Any]],
    report_path: str | Path,
    started: float,
    rows: int,
    details: dict[str, Any],
    provenance_path: str | Path | None = None,
) -> dict[str, Any]:
    """Write the report (always) and raise QualityGateError when any expectation failed.

    The report holds results only; the time the gate took goes to `provenance_path` (default:
    `<report>_provenance.json` beside it), so a rerun on the same data writes the same report.
    """
    failed = [s for s in summaries if not s["success"]]
    report = {
        "gate": gate,
        "success": not failed,
        "rows": rows,
        "evaluated": len(summaries),
        "failed": [s["name"] for s in failed],
        "details": _plain(details),
        "expectations": summaries,
    }
    write_json(report_path, report)
    write_provenance(
        provenance_path or beside(report_path), f"{gate} gate", elapsed_s=round(time.perf_counter() - started, 3)
    )
    if failed:
        reasons = " | ".join(_describe_failure(s) for s in failed)
        raise QualityGateError(
            f"quality gate '{gate}' failed {len(failed)} of {len(summaries)} expectations: {reasons} "
            f"(full report: {report_path}; fix the upstream stage or the quality.* params)"
        )
    return report
