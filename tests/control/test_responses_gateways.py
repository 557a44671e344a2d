"""Two gateways on one PostgreSQL database, each serving smollm2-135m embedded, with no control
plane (responses are stored in `database_url` all the same, under key ids both name alike): a
response created through one is retrieved and continued through the other, and a background
response running on one is cancelled through the other (which stops its generation there within
a lease round)."""

from __future__ import annotations

import time

import openai
import pytest

from testkit.pg import fresh_database
from testkit.servers import OPENAI_PREFIX, served

pytestmark = pytest.mark.model

KEY, SMOL = "sk-responses-pg", "smollm2-135m"


def test_two_gateways_share_responses(tmp_path, pg_server):
    url = fresh_database(pg_server, "responses_gateways")
    config = (f'[server]\napi_keys = ["{KEY}"]\ndatabase_url = "{url}"\n\n'
              f'[[endpoints]]\nname = "{SMOL}"\ncontext = 1024\nparallel = 2\nthreads = 1\n')
    with served(tmp_path / "a", config, name="a", key=KEY) as a, served(tmp_path / "b", config, name="b", key=KEY) as b:
        ca = openai.OpenAI(base_url=a.base + OPENAI_PREFIX, api_key=KEY, max_retries=0, timeout=120)
        cb = openai.OpenAI(base_url=b.base + OPENAI_PREFIX, api_key=KEY, max_retries=0, timeout=120)
        first = ca.responses.create(model=SMOL, input="My secret number is 4721. Say OK.", temperature=0,
                                    max_output_tokens=8)
        assert cb.responses.retrieve(first.id).model_dump() == first.model_dump()
        second = cb.responses.create(model=SMOL, input="What is my secret number?", previous_response_id=first.id,
                                     temperature=0, max_output_tokens=12)
        texts = [i.content[0].text for i in ca.responses.input_items.list(second.id, order="asc").data]
        assert texts == ["My secret number is 4721. Say OK.", first.output_text, "What is my secret number?"]
        long = ca.responses.create(model=SMOL, input="Write a very long story about dragons.", temperature=0,
                                   max_output_tokens=900, background=True)
        assert cb.responses.cancel(long.id).status == "cancelled"
        deadline = time.monotonic() + 30
        while a.endpoint()["in_flight"] and time.monotonic() < deadline:      # a's run stops within a lease round
            time.sleep(0.5)
        assert a.endpoint()["in_flight"] == 0
        assert ca.responses.retrieve(long.id).status == "cancelled"
