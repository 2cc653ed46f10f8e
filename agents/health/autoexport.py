"""JSON files in the shape of Health Auto Export (the popular iOS app that syncs
HealthKit data on a schedule), dropped into the export folder by its folder/iCloud
automations: ``{"data": {"metrics": [{"name", "units", "data": [...]}], "workouts": [...]}}``.

Read: ``step_count`` samples (``qty``, ``date``, ``source``; each covers the minute that
starts at ``date``, the app's default minute aggregation), ``heart_rate_variability``
in ms, and workouts (``start``/``end``). Every sample's date also moves the coverage
mark, so a sync that brings heart rate but no steps still says "no steps until now".
Entries of another shape are counted as invalid and skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agents.health.harvest import Harvest
from agents.health.parser import ExportError

SAMPLE_SECONDS = 60


def read_autoexport(path: Path, *, max_bytes: int) -> Harvest:
    with path.open("rb") as stream:
        raw = stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ExportError(f"JSON file larger than the limit of {max_bytes >> 20} MiB")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise ExportError("not valid JSON") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise ExportError("not a Health Auto Export file: no data object")
    harvest = Harvest()
    for metric in _list(data.get("metrics")):
        if not isinstance(metric, dict):
            continue
        name, units = metric.get("name"), metric.get("units")
        for sample in _list(metric.get("data")):
            try:
                _sample(harvest, name, units, sample)
            except (KeyError, TypeError, ValueError, IndexError):
                harvest.counts["invalid"] += 1
    for workout in _list(data.get("workouts")):
        try:
            harvest.add_workout(workout["start"], workout["end"])
        except (KeyError, TypeError, ValueError, IndexError):
            harvest.counts["invalid"] += 1
    return harvest


def _sample(harvest: Harvest, name: Any, units: Any, sample: Any) -> None:
    stamp = sample["date"]
    harvest.note(harvest.moment(stamp))
    if name == "step_count" and units == "count":
        source = harvest.source_key(str(sample.get("source") or "Health Auto Export"), None)
        t0 = harvest.local_seconds(stamp)
        harvest.add_steps_local(source, t0, t0 + SAMPLE_SECONDS, float(sample["qty"]))
    elif name == "heart_rate_variability" and units == "ms":
        harvest.add_hrv(stamp, float(sample["qty"]))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
