"""The console's Batches page (issue 23) through the admin API in process. The control plane's
batches routes come with the Batch API (another branch); until they are merged, a stub of the
three this page calls (the listing, cancel, a file's content), in their documented shapes, is
added to the real app, so the page's calls still go through the whole app (internal.call)."""

from __future__ import annotations

import pytest
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse

from consoleapp import ADMIN, VIEWER, login

RUNNING = {"id": "batch_run", "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
           "input_file_id": "file-in", "completion_window": "24h", "status": "in_progress",
           "output_file_id": None, "error_file_id": None, "created_at": 1_800_000_100,
           "request_counts": {"total": 200, "completed": 120, "failed": 3}, "metadata": None, "owner": "key_a"}
DONE = {**RUNNING, "id": "batch_done", "status": "completed", "created_at": 1_800_000_000,
        "output_file_id": "file-out", "error_file_id": "file-err", "owner": "key_<b>",
        "request_counts": {"total": 10, "completed": 9, "failed": 1}}
OUTPUT = b"".join(b'{"custom_id": "r%d", "response": {"status_code": 200}}\n' % i for i in range(5000))


@pytest.fixture
def stub(app):
    state = {"batches": {b["id"]: dict(b) for b in (RUNNING, DONE)}, "cancels": []}
    api = APIRouter(prefix="/api/v1/control")

    @api.get("/batches")
    async def listing(limit: int = 20, after: str | None = None):
        return {"object": "list", "data": list(state["batches"].values()), "has_more": False,
                "first_id": "batch_run", "last_id": "batch_done"}

    @api.post("/batches/{batch_id}/cancel")
    async def cancel(batch_id: str):
        state["cancels"].append(batch_id)
        b = state["batches"].get(batch_id)
        if b is None:
            return JSONResponse({"error": {"message": f"No batch {batch_id}", "type": "invalid_request_error",
                                           "param": "batch_id", "code": None}}, 404)
        b["status"] = "cancelling"
        return b

    @api.get("/files/{file_id}/content")
    async def content(file_id: str):
        if file_id != "file-out":
            return JSONResponse({"error": {"message": f"No such File object: {file_id}",
                                           "type": "invalid_request_error", "param": "id", "code": None}}, 404)

        async def chunks():
            for i in range(0, len(OUTPUT), 65536):
                yield OUTPUT[i:i + 65536]
        return StreamingResponse(chunks(), media_type="application/octet-stream")

    app.include_router(api)
    return state


def test_the_page_shows_status_progress_and_results(client, stub):
    login(client, ADMIN)
    page = client.get("/console/batches").text
    run = page[page.index('data-batch="batch_run"'):page.index('data-batch="batch_done"')]
    assert 'data-status="in_progress"' in run and "123/200 (61%)" in run
    assert '<progress max="200" value="123"' in run
    assert 'hx-post="/console/batches/batch_run/cancel"' in run and "/console/files/" not in run
    done = page[page.index('data-batch="batch_done"'):]
    assert 'data-status="completed"' in done and "10/10 (100%)" in done
    assert 'href="/console/files/file-out/content"' in done and 'href="/console/files/file-err/content"' in done
    assert "/cancel" not in done.split("</tr>")[0]          # an ended batch has no Cancel
    assert "key_&lt;b&gt;" in done                          # escaped
    assert page.index("batch_run") < page.index("batch_done")       # newest first


def test_cancel_goes_through_the_api(client, stub):
    csrf = login(client, ADMIN)
    r = client.post("/console/batches/batch_run/cancel", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and "Batch batch_run is cancelling." in r.text
    assert 'data-status="cancelling"' in r.text and stub["cancels"] == ["batch_run"]
    r = client.post("/console/batches/batch_nope/cancel", headers={"X-CSRF-Token": csrf})
    assert "Refused (404): No batch batch_nope" in r.text
    # an id that is not one never reaches the API
    r = client.post("/console/batches/a%2F..%2Fx/cancel", headers={"X-CSRF-Token": csrf})
    assert r.status_code in (404, 422) and stub["cancels"] == ["batch_run", "batch_nope"]


def test_download_streams_the_file_and_refuses_one_that_is_not_there(client, stub):
    login(client, VIEWER)               # reading results is a read
    r = client.get("/console/files/file-out/content")
    assert r.status_code == 200 and r.content == OUTPUT
    assert r.headers["content-disposition"] == 'attachment; filename="file-out.jsonl"'
    r = client.get("/console/files/file-nope/content")
    assert r.status_code == 404 and "No such File object: file-nope" in r.text


def test_without_the_batches_routes_the_page_says_so(client):
    login(client, ADMIN)
    r = client.get("/console/batches")
    assert r.status_code == 200 and "the batches API answered 404" in r.text
