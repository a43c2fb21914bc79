"""One complete output directory: exports + recipe + report of one result, written together.

Every front end that writes a result to a folder (``workbench compress``, the window's Export,
`core.session.Session.export`) goes through `write_outputs`, so the files always come from the
same run and appear together or not at all (`core.base.outdir.OutputTransaction`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.base.outdir import output_dir, pause_point
from core.base.progress import CancelToken, ProgressFn, no_progress, scaled
from core.export.deploy import check_records
from core.export.formats import FILE_NAMES, export_all
from core.export.report import write_report
from core.recipe.plan import CompressionPlan


def owned_names() -> tuple[str, ...]:
    """Names a compress run writes or makes stale: every export file, recipe and report."""

    return (*FILE_NAMES.values(), "recipe.json", "report.json", "report.html")


def write_outputs(
    result: Any,
    formats: Sequence[str],
    out: str | Path,
    *,
    force: bool = False,
    merge_existing: bool = False,
    owned: Collection[str] | None = None,
    **kw: Any,
) -> tuple[list[Any], dict[str, Any] | None]:
    """Write ``result`` in ``formats`` plus ``recipe.json`` and the report into ``out``, as
    one transaction (complete or untouched; see `write_into` for the other parameters).

    ``force``: replace this run's files where they exist (refused up front otherwise).
    ``merge_existing``: keep every other file of an existing ``out`` (the window's Export
    adds files); without it the folder describes this run alone (user files are still kept).
    """

    out = Path(out)
    with output_dir(
        out,
        force=force,
        merge_existing=merge_existing,
        owned=owned_names() if owned is None else owned,
    ) as stage:
        # Merged into an existing folder: an export file already there needs ``force``.
        return write_into(stage, out, result, formats, replace_files=force, **kw)


def write_into(
    stage: Path,
    out: Path,
    result: Any,
    formats: Sequence[str],
    *,
    plan: CompressionPlan | None = None,
    evals: Mapping[str, Any] | None = None,
    data: Any = None,
    report: bool = True,
    entropy: bool = False,
    replace_files: bool = True,
    deployed: bool = True,
    report_extra: Mapping[str, Any] | Callable[[list[Any]], Mapping[str, Any]] | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> tuple[list[Any], dict[str, Any] | None]:
    """Write the files into the staging folder ``stage`` of an open output transaction whose
    final place is ``out`` (``workbench compress`` opens it before any work).

    Parameters
    ----------
    plan
        The recipe to record (default: the result's own plan).
    evals
        ``{"before": EvalResult, "after": EvalResult, "data": name}`` for the report.
    data
        Held-out inputs used to verify exports (ONNX outputs, int8 calibration).
    replace_files
        Overwrite export files the staging folder already holds (carried over from an
        existing folder); otherwise such a file is an `ExportError`.
    deployed
        Run each written runnable file on ``data`` (`core.export.deploy.check_records`): deployed
        accuracy / fidelity and latency per export, mismatches listed under ``warnings``.
    report_extra
        Further top-level blocks for ``report.json`` (``device``, ``cost``), or a function of
        the checked export records returning them.

    Returns
    -------
    (records, report)
        The `core.export.formats.ExportRecord`s (paths where the files will be once committed) and
        the report's JSON content (``None`` when ``report`` is False).
    """

    records = export_all(
        result,
        list(formats),
        stage,
        force=replace_files,
        data=data,
        entropy=entropy,
        progress=scaled(progress, 0, 0.9),
        cancel=cancel,
    )
    warnings: list[str] = []
    if deployed:
        progress(0.9, "checking the deployed files")
        records, warnings = check_records(
            records, result, data, progress=scaled(progress, 0.9, 1.0), cancel=cancel
        )
    # Records name each file where it will be once the staging folder is committed.
    records = [replace(r, path=out / r.path.name) for r in records]
    pause_point("exported")
    (plan or result.plan).save(stage / "recipe.json")
    content = None
    if report:
        blocks = report_extra(records) if callable(report_extra) else report_extra
        extra = {"warnings": warnings, **dict(blocks or {})}
        json_path, _ = write_report(result, stage, evals=evals or {}, exports=records, extra=extra)
        content = json.loads(Path(json_path).read_text(encoding="utf-8"))
    return records, content
