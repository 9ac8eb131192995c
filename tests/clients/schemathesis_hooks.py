"""Schemathesis hooks for tests/api.rs.

POST /api/track rejects an event whose `ts` is more than 24 h ahead of the
engine's clock (400 out_of_range), as the Kafka consumer does. That bound moves
with the clock, so the static schema cannot state it; bodies beyond it are not
generated (the bound itself is tested in tests/api.rs and src/pipeline.rs).
"""

import time

import schemathesis

# A minute of slack for the clock moving during the run.
FUTURE_BOUND_MS = 24 * 3600 * 1000 - 60 * 1000


@schemathesis.hook
def filter_body(context, body):
    if not isinstance(body, dict):
        return True
    ts = body.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return True
    return ts <= time.time() * 1000 + FUTURE_BOUND_MS
