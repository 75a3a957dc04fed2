"""Whose an explanation task is (serving/explain_tasks.TaskStore.caller_of), read from rows that BentoML's own task
store wrote: the caller's name travels in the stored submission, so it is deleted with the task."""

import asyncio

import pytest

pytest.importorskip("bentoml")

from braintumor.serving.explain_tasks import CALLER_HEADER, TaskStore  # noqa: E402


def _submit(db: str, headers: list[tuple[bytes, bytes]]) -> str:
    from _bentoml_impl.tasks import Sqlite3Store
    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": b'{"method": "gradcam"}', "more_body": False}

    async def go():
        async with Sqlite3Store(db) as store:
            scope = {"type": "http", "method": "POST", "path": "/explain/submit", "query_string": b"",
                     "headers": headers}
            return await store.new_entry("explain", Request(scope, receive))

    Sqlite3Store.init_db(db)
    return asyncio.run(go())


def test_the_caller_stored_with_a_submission(tmp_path):
    db = str(tmp_path / "task_result.db")
    content = [(b"content-type", b"application/json")]
    alice = _submit(db, [*content, (CALLER_HEADER, b"name:alice")])
    anonymous = _submit(db, content)  # submitted before keys were configured
    twice = _submit(db, [*content, (CALLER_HEADER, b"name:alice"), (CALLER_HEADER, b"name:bob")])
    store = TaskStore(db, ttl_s=3600)
    assert store.caller_of(alice) == "name:alice"
    assert store.caller_of(anonymous) is None and store.caller_of(twice) is None
    assert store.caller_of("0" * 32) is None
    assert store.delete(alice) and store.caller_of(alice) is None  # the caller goes with the row


def test_no_task_table_yet_is_nobody(tmp_path):
    assert TaskStore(str(tmp_path / "empty.db"), ttl_s=3600).caller_of("x") is None
