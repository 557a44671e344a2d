"""docs/scaling.md's autoscaler section names only series a gateway's /metrics exports: every
`modelyard_...` name in it (its table and its KEDA ScaledObject's queries) is in a live
/metrics, of a gateway with an on-demand endpoint (nothing is loaded for that)."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from modelyard.api.app import create_app
from modelyard.settings import EndpointSpec, Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"
SECTION = "## Scaling to zero: keep-alive and an autoscaler (KEDA)"


def section() -> str:
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    rest = text.split(SECTION, 1)[1]
    return rest.split("\n## ", 1)[0]


def exported(tmp_path: Path) -> set[str]:
    settings = Settings(store_dir=tmp_path, endpoints=(EndpointSpec(name="llama-70b", load="on_demand"),))
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        text = client.get("/metrics").text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_scaled_object_reads_series_the_gateway_exports(tmp_path):
    body = section()
    names = set(re.findall(r"\bmodelyard_[a-z_]+[a-z]", body))
    assert {"modelyard_endpoint_pending", "modelyard_endpoint_load_waiting"} <= names
    assert "kind: ScaledObject" in body and 'endpoint="llama-70b"' in body
    missing = names - exported(tmp_path)
    assert not missing, f"docs/scaling.md names series /metrics does not export: {sorted(missing)}"
