"""`gpu-status --json`: one node's GPUs as JSON, and the schema they follow.

The whole output has one schema id, SCHEMA_ID: the document (gpustatus.REPORT_SCHEMA) and
each node object in it (JSON_SCHEMA) name it. Stable: fields are only ever added, and each
addition moves the id (`/2` added `processes[].slurm_job_id`).
"""

from __future__ import annotations

import dataclasses

from ddpfleet.gpu import Gpu, NodeGpus

SCHEMA_ID = "ddpfleet.gpu-status-report/2"

# --- the schema ------------------------------------------------------------------------------

_INT = {"type": "integer"}
_STR = {"type": "string"}
_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_NUM = {"type": ["number", "null"]}
_NULLABLE_STR = {"type": ["string", "null"]}


def _object(properties: dict) -> dict:
    """A closed object: every property required (nullable ones may be null), nothing else."""
    return {
        "type": "object",
        "required": list(properties),
        "additionalProperties": False,
        "properties": properties,
    }


def _array(items: dict) -> dict:
    return {"type": "array", "items": items}


_PROCESS_SCHEMA = _object(
    {
        "pid": _INT,
        "user": _NULLABLE_STR,
        "mem_mib": _NULLABLE_INT,
        "command": _STR,
        "run_id": _NULLABLE_STR,  # the ddpfleet run it belongs to
        "slurm_job_id": _NULLABLE_STR,  # the Slurm job it belongs to (SLURM_JOB_ID)
        "device_uuid": _NULLABLE_STR,  # GPU-... or, under MIG, MIG-...
    }
)
_GPU_SCHEMA = _object(
    {
        "index": _INT,
        "uuid": _STR,
        "name": _STR,
        "bus_id": _NULLABLE_STR,
        "driver": _STR,
        "util_pct": _NULLABLE_INT,
        "mem_used_mib": _NULLABLE_INT,
        "mem_total_mib": _NULLABLE_INT,
        "temp_c": _NULLABLE_INT,
        "power_w": _NULLABLE_NUM,
        "power_limit_w": _NULLABLE_NUM,
        "mig_mode": _NULLABLE_STR,
        "processes": _array(_PROCESS_SCHEMA),
    }
)

# One node in `gpu-status --json` (each of the document's `nodes`: SCHEMA_ID#node). `reachable`
# false: SSH failed, `error` says why and `gpus` is empty. `error` with `reachable` true:
# nvidia-smi failed or is absent, `exit_code` is its exit status (127: not installed). Values
# nvidia-smi could not give ([N/A]) are null.
JSON_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$anchor": "node",
    **_object(
        {
            "schema": {"const": SCHEMA_ID},
            "node": _STR,
            "reachable": {"type": "boolean"},
            "error": _NULLABLE_STR,
            "exit_code": _NULLABLE_INT,
            "gpus": _array(_GPU_SCHEMA),
            "unattached": _array(_PROCESS_SCHEMA),  # apps whose GPU could not be determined
            "notes": _array(_STR),
        }
    ),
}


def _gpu_json(gpu: Gpu) -> dict:
    # asdict keeps tuples; JSON-ready means lists, so `to_json(...) == json.loads(dumps(...))`.
    return {**dataclasses.asdict(gpu), "processes": [dataclasses.asdict(p) for p in gpu.processes]}


def to_json(node_name: str, ng: NodeGpus) -> dict:
    """One node as a JSON-ready dict matching JSON_SCHEMA, e.g.

    {"schema": "ddpfleet.gpu-status-report/2", "node": "node0", "reachable": true, "error": null,
     "exit_code": 0, "gpus": [{"index": 0, "uuid": "GPU-...", ..., "processes": []}],
     "unattached": [], "notes": []}
    """
    return {
        "schema": SCHEMA_ID,
        "node": node_name,
        "reachable": True,
        "error": ng.driver_error,
        "exit_code": ng.exit_code,
        "gpus": [_gpu_json(gpu) for gpu in ng.gpus],
        "unattached": [dataclasses.asdict(app) for app in ng.unattached],
        "notes": list(ng.notes),
    }


def unreachable_json(node_name: str, error: str) -> dict:
    """A node SSH could not reach, in the same shape (so `--json` readers see every node)."""
    return to_json(node_name, NodeGpus((), error, None)) | {"reachable": False}
