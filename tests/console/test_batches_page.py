"""The console's Batches page (issue 23) over the real batches store and the admin API's
routes, in process: batches made in the store as the batch API makes them (one left running
against the app's remote endpoint, whose replica is down; one finished with its output and
error files), then listed, cancelled and downloaded through the page."""

from __future__ import annotations

import pytest

from consoleapp import ADMIN, VIEWER, login

OUTPUT_LINES = 2000          # results of ~700 bytes: an output file of two 1 MiB chunks


def line(i: int) -> bytes:
    return (b'{"custom_id": "r%d", "method": "POST", "url": "/v1/chat/completions", '
            b'"body": {"model": "remote", "messages": [{"role": "user", "content": "hi"}]}}\n' % i)


def finished_line(store, batch_id: str, i: int, ok: bool) -> None:
    leased = store.lease_lines("test-runner", 1, 60)
    assert [(lease.batch_id, lease.line) for lease in leased] == [(batch_id, i)]
    result = {"id": f"batch_req_{i}", "custom_id": f"r{i}",
              "response": {"status_code": 200, "request_id": f"req_{i}", "body": {"n": i, "pad": "x" * 600}} if ok else None,
              "error": None if ok else {"code": "boom", "message": "failed"}}
    assert store.finish_line(leased[0], ok, result)


@pytest.fixture
def batches(app, client):
    """(running id, done id, the done batch's output bytes)."""
    store = client.portal.call(app.state.batches.store)
    app.state.batches.stopping = True          # this test's own hands run the lines
    done_file = store.files.write(None, "batch", "done.jsonl", [line(i) for i in range(OUTPUT_LINES)])
    done = store.create(None, done_file["id"], "/v1/chat/completions", None, 60)["id"]
    store.validate(done, "/v1/chat/completions", lambda model: None, 50_000)
    for i in range(OUTPUT_LINES):
        finished_line(store, done, i, ok=i != 7)
    store.finalize(done, "completed")
    run_file = store.files.write(None, "batch", "run.jsonl", [line(i) for i in range(200)])
    running = store.create(None, run_file["id"], "/v1/chat/completions", None, 60)["id"]
    store.validate(running, "/v1/chat/completions", lambda model: None, 50_000)
    for i in range(3):
        finished_line(store, running, i, ok=True)
    output = b"".join(store.files.content(None, store.get(None, done)["output_file_id"])[1])
    return running, done, output


def test_the_page_shows_status_progress_and_results(client, batches):
    running, done, _ = batches
    login(client, ADMIN)
    page = client.get("/console/batches").text
    run = page[page.index(f'data-batch="{running}"'):page.index(f'data-batch="{done}"')]
    assert 'data-status="in_progress"' in run and "3/200 (1%)" in run
    assert '<progress max="200" value="3"' in run
    assert f'hx-post="/console/batches/{running}/cancel"' in run and "/console/files/" not in run
    ended = page[page.index(f'data-batch="{done}"'):]
    assert 'data-status="completed"' in ended and f"{OUTPUT_LINES}/{OUTPUT_LINES} (100%)" in ended
    assert "/cancel" not in ended.split("</tr>")[0]          # an ended batch has no Cancel
    assert ended.count('href="/console/files/file-') == 2     # its output and error files
    assert page.index(running) < page.index(done)             # newest first


def test_cancel_goes_through_the_api_and_is_audited(client, batches):
    running, done, _ = batches
    csrf = login(client, ADMIN)
    r = client.post(f"/console/batches/{running}/cancel", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and f"Batch {running} is cancelling." in r.text
    assert 'data-status="cancelling"' in r.text
    audit = client.get("/api/v1/control/audit-log", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert [(e["action"], e["object_id"]) for e in audit["data"] if e["action"] == "batch.cancel"] \
        == [("batch.cancel", running)]
    r = client.post("/console/batches/batch_nope/cancel", headers={"X-CSRF-Token": csrf})
    assert "Refused (404): no batch with id &#39;batch_nope&#39;" in r.text
    # an id that is not one never reaches the API
    r = client.post("/console/batches/a%2F..%2Fx/cancel", headers={"X-CSRF-Token": csrf})
    assert r.status_code in (404, 422)


def test_download_streams_the_file_for_admins_only(client, batches, app):
    _, done, output = batches
    login(client, ADMIN)
    page = client.get("/console/batches").text
    out_id = page[page.index(f'data-batch="{done}"'):].split('href="/console/files/')[1].split("/")[0]
    r = client.get(f"/console/files/{out_id}/content")
    assert r.status_code == 200 and r.content == output and output.count(b"\n") == OUTPUT_LINES - 1 and len(output) > 1 << 20
    assert r.headers["content-disposition"] == f'attachment; filename="{out_id}.jsonl"'
    r = client.get("/console/files/file-nope/content")
    assert r.status_code == 404 and "no file with id &#39;file-nope&#39;" in r.text
    client.post("/console/logout", headers={"X-CSRF-Token": login(client, VIEWER)})
    login(client, VIEWER)               # a viewer sees the page, not the customers' results
    assert client.get("/console/batches").status_code == 200
    assert client.get(f"/console/files/{out_id}/content").status_code == 403
